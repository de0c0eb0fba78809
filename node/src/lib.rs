//! `pdsno-node`: the controller behind the `pdsno` binary.
//!
//! Rooms: [`cli`] (argument parsing and dispatch), [`cmd`] (one file per subcommand
//! family), [`nib`] (the SQLite state store).

pub mod cli;
pub mod cmd;
pub mod nib;
