//! Device discovery: local controllers scan their subnet and report what changed,
//! regional controllers keep their region's devices and summarise them for the global
//! controller's inventory.

pub mod delivery;
pub mod gc;
pub mod lc;
pub mod rc;
pub mod scanner;
