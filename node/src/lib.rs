//! pdsno node library.
