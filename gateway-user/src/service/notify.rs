//! systemd's readiness protocol (`sd_notify(3)`), for `Type=notify` units: `READY=1` once
//! serving, `RELOADING=1` … `READY=1` around a reload, `STOPPING=1` when the drain begins,
//! `STATUS=` lines for `systemctl status`, and `WATCHDOG=1` pings when the unit sets
//! `WatchdogSec=` (systemd passes `WATCHDOG_USEC`). Outside systemd (`NOTIFY_SOCKET` unset)
//! every call does nothing. `gateway-user/tests/service_lifecycle.rs` checks the messages on a
//! socket of its own, as systemd would receive them.

use std::time::Duration;

use sd_notify::NotifyState;

/// Sends notifications to the service manager, if there is one.
#[derive(Clone, Debug)]
pub struct Notifier {
    enabled: bool,
}

impl Notifier {
    pub fn from_env() -> Notifier {
        Notifier {
            enabled: std::env::var_os("NOTIFY_SOCKET").is_some(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    fn send(&self, states: &[NotifyState<'_>]) {
        if !self.enabled {
            return;
        }
        if let Err(e) = sd_notify::notify(states) {
            tracing::warn!(error = %e, "could not notify the service manager (NOTIFY_SOCKET)");
        }
    }

    /// Serving. `main_pid`: this process replaces the unit's main process (binary upgrade).
    pub fn ready(&self, status: &str, main_pid: bool) {
        let pid = std::process::id();
        if main_pid {
            self.send(&[
                NotifyState::MainPid(pid),
                NotifyState::Ready,
                NotifyState::Status(status),
            ]);
        } else {
            self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
        }
    }

    /// A reload begins; [`Notifier::ready`] ends it.
    pub fn reloading(&self) {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[NotifyState::Reloading, now]),
            Err(_) => self.send(&[NotifyState::Reloading]),
        }
    }

    /// The drain begins; `expected` is how long it may take, so that systemd waits at least
    /// that long before it escalates to SIGKILL (it never shortens `TimeoutStopSec=`).
    pub fn stopping(&self, status: &str, expected: Duration) {
        let usec = u32::try_from(expected.as_micros()).unwrap_or(u32::MAX);
        self.send(&[
            NotifyState::Stopping,
            NotifyState::Status(status),
            NotifyState::ExtendTimeoutUsec(usec),
        ]);
    }

    pub fn status(&self, status: &str) {
        self.send(&[NotifyState::Status(status)]);
    }

    pub fn watchdog(&self) {
        self.send(&[NotifyState::Watchdog]);
    }

    /// How often to ping the watchdog (half its timeout), when the unit has one.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        if !self.enabled {
            return None;
        }
        sd_notify::watchdog_enabled().map(|timeout| timeout / 2)
    }
}

/// Pings the watchdog from the runtime it is spawned on: if that runtime (signals, reloads,
/// admin) stops turning, systemd restarts the service.
pub async fn watchdog(notifier: Notifier, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        notifier.watchdog();
    }
}
