//! The kernel side's anomaly lines (aya-log, written by `gateway-ebpf/src/anomaly.rs`),
//! forwarded to `tracing` at warn level with target `gateway::kernel`, so that they land in
//! the same log as everything else. The kernel rate-limits them; this only reads them.

use aya::Ebpf;
use aya_log::EbpfLogger;

/// Target of the forwarded lines.
pub const TARGET: &str = "gateway::kernel";

pub struct KernelLog(EbpfLogger<Forward>);

impl KernelLog {
    /// Takes the object's `AYA_LOGS` ring buffer.
    pub fn take(ebpf: &mut Ebpf) -> Result<KernelLog, aya_log::Error> {
        EbpfLogger::init_with_logger(ebpf, Forward).map(KernelLog)
    }

    /// Forwards every line waiting. Never blocks.
    pub fn flush(&mut self) {
        self.0.flush();
    }
}

pub struct Forward;

impl log::Log for Forward {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let message = record.args().to_string();
        match record.level() {
            log::Level::Error => tracing::error!(target: TARGET, "{message}"),
            log::Level::Warn => tracing::warn!(target: TARGET, "{message}"),
            log::Level::Info => tracing::info!(target: TARGET, "{message}"),
            _ => tracing::debug!(target: TARGET, "{message}"),
        }
    }

    fn flush(&self) {}
}
