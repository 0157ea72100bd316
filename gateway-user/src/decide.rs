//! Every decision the kernel's evidence drives, as plain code that takes the time as a
//! parameter: what a failure means (`evidence`), the per-endpoint health state machine
//! (`health`), the adaptive connect deadline (`deadline`), latency-aware balancing (`latency`),
//! when to probe and what a probe says (`probe`), whether to retry (`retry`), the retry and
//! hedge budgets (`budget`), gRPC's rules (`grpc`: status codes, `grpc-timeout`), and the
//! share an endpoint back from an ejection takes (`slow_start`). Sockets,
//! timers and maps only feed them; everything here is tested without any of those.

pub mod budget;
pub mod deadline;
pub mod evidence;
pub mod grpc;
pub mod health;
pub mod latency;
pub mod probe;
pub mod retry;
pub mod slow_start;
