//! Decisions the kernel's evidence drives, as plain code: the adaptive connect deadline, the
//! per-endpoint health state machine, and the hedge budget. Sockets, timers and maps only feed
//! them; everything here is tested without any of those.

pub mod deadline;
pub mod health;
pub mod retry;
