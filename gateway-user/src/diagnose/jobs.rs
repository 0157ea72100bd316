//! The probe schedule of a run: one job per address of every target, its attempts started
//! [`Schedule::interval`] apart and overlapping, at most [`MAX_IN_FLIGHT`] at once, with the
//! kernel's records drained meanwhile; and the patient jobs that follow when a configured
//! deadline cut connects short.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::{sync::Semaphore, task::JoinSet};

use super::{
    DiagnoseArgs, PATIENT_COUNT,
    kernel::KernelSession,
    probe::{self, ConnectResult, HttpPlan, Observed, Schedule},
    report::Progress,
    resolve::Resolved,
};
use crate::observer::stream::DRAIN_INTERVAL;

/// Attempts in flight at once (each holds a socket).
const MAX_IN_FLIGHT: usize = 256;

/// Jobs that follow some of the first ones, and for each first job the index of its own.
pub(super) type FollowUps = (Vec<Job>, Vec<Option<usize>>);

/// One address to probe, with its schedule.
#[derive(Clone)]
pub(super) struct Job {
    pub target: usize,
    pub addr: SocketAddr,
    pub schedule: Schedule,
}

impl Job {
    /// Attempts this job makes.
    pub fn count(&self) -> usize {
        self.schedule.count as usize
    }
}

/// `--count` connects to every address of every target, each with `deadline`.
pub(super) fn plan(args: &DiagnoseArgs, resolved: &[Resolved], deadline: Duration) -> Vec<Job> {
    let interval = Duration::from_millis(args.interval_ms);
    let mut jobs = Vec::new();
    for (t, r) in resolved.iter().enumerate() {
        let http = args.http.as_deref().map(|path| {
            Arc::new(HttpPlan::get(
                &r.host_header,
                path,
                Duration::from_millis(args.response_timeout_ms),
            ))
        });
        for &addr in &r.addrs {
            jobs.push(Job {
                target: t,
                addr,
                schedule: Schedule {
                    count: args.count,
                    interval,
                    deadline,
                    http: http.clone(),
                },
            });
        }
    }
    jobs
}

/// A few connects with `deadline` (the kernel's own budget) to every address where the
/// configured deadline cut a connect short, to see how long the handshake really takes.
/// Returns them, and for each job the index of its patient job.
pub(super) fn plan_patient(
    args: &DiagnoseArgs,
    jobs: &[Job],
    observed: &[Vec<Observed>],
    deadline: Duration,
) -> FollowUps {
    let mut patient = Vec::new();
    let mut patient_of = vec![None; jobs.len()];
    for (j, job) in jobs.iter().enumerate() {
        if observed[j]
            .iter()
            .any(|o| o.result == ConnectResult::DeadlineHit)
        {
            patient_of[j] = Some(patient.len());
            patient.push(Job {
                target: job.target,
                addr: job.addr,
                schedule: Schedule {
                    count: PATIENT_COUNT.min(args.count),
                    interval: Duration::from_millis(args.interval_ms),
                    deadline,
                    http: None,
                },
            });
        }
    }
    (patient, patient_of)
}

/// Connects to another port of a host whose connects all went unanswered.
pub const OTHER_PORT_COUNT: u32 = 3;

/// Their deadline: a host that is up answers within a round trip; the first SYN retransmit
/// (after 1 s) is not waited for.
pub const OTHER_PORT_DEADLINE: Duration = Duration::from_secs(1);

/// The port asked instead of `port`: 65535 (reserved, almost never listened on), or 65534 for a
/// target on 65535.
pub fn other_port(port: u16) -> u16 {
    if port == u16::MAX {
        u16::MAX - 1
    } else {
        u16::MAX
    }
}

/// A few connects to [`other_port`] of every address whose connects, and patient connects,
/// all went unanswered (see `measure::OtherPort`). Returns them, and for each job the index
/// of its other-port job. An address whose host answered every connect of another target of
/// this run (an RST or a SYN-ACK on another port) needs none: the pairs of the silent job and
/// the job that answered come last, whose attempts stand for the other port's. (A target
/// answered only in part is no such evidence: its own SYNs went unanswered too.)
pub(super) fn plan_other_port(
    jobs: &[Job],
    observed: &[Vec<Observed>],
    (patient, patient_of): (&[Vec<Observed>], &[Option<usize>]),
) -> (FollowUps, Vec<(usize, usize)>) {
    let silent = |o: &Observed| {
        matches!(o.result, ConnectResult::DeadlineHit)
            || matches!(o.result, ConnectResult::Failed(e) if e == libc::ETIMEDOUT)
    };
    let answered = |o: &Observed| {
        matches!(o.result, ConnectResult::Established)
            || matches!(o.result, ConnectResult::Failed(e) if e == libc::ECONNREFUSED)
    };
    let mut other: Vec<Job> = Vec::new();
    let mut other_of = vec![None; jobs.len()];
    let mut answered_by = Vec::new();
    for (j, job) in jobs.iter().enumerate() {
        let patient = patient_of[j].map_or(&[][..], |q| &patient[q][..]);
        if observed[j].is_empty() || !observed[j].iter().chain(patient).all(silent) {
            continue;
        }
        let same_host = jobs.iter().enumerate().position(|(k, o)| {
            o.addr.ip() == job.addr.ip()
                && o.addr.port() != job.addr.port()
                && !observed[k].is_empty()
                && observed[k].iter().all(answered)
        });
        if let Some(k) = same_host {
            answered_by.push((j, k));
            continue;
        }
        let mut addr = job.addr;
        addr.set_port(other_port(addr.port()));
        // One job per host (and port), however many of its targets went silent.
        if let Some(q) = other.iter().position(|o| o.addr == addr) {
            other_of[j] = Some(q);
            continue;
        }
        other_of[j] = Some(other.len());
        other.push(Job {
            target: job.target,
            addr,
            schedule: Schedule {
                count: OTHER_PORT_COUNT,
                interval: Duration::ZERO,
                deadline: OTHER_PORT_DEADLINE,
                http: None,
            },
        });
    }
    ((other, other_of), answered_by)
}

/// Runs every job's attempts, draining the kernel's records meanwhile. Returns attempt `i`
/// of job `j` at `[j][i]`, and when each job's last attempt ended.
pub(super) async fn run_jobs(
    jobs: &[Job],
    kernel: &mut Option<KernelSession>,
    progress: &mut Progress,
) -> anyhow::Result<(Vec<Vec<Observed>>, Vec<Instant>)> {
    let mut finished = vec![Instant::now(); jobs.len()];
    let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut set = JoinSet::new();
    for (j, job) in jobs.iter().enumerate() {
        for i in 0..job.schedule.count {
            let (addr, schedule, permits) = (job.addr, job.schedule.clone(), permits.clone());
            set.spawn(async move {
                tokio::time::sleep(schedule.interval * i).await;
                let _permit = permits.acquire_owned().await;
                let o = probe::attempt(addr, schedule.deadline, schedule.http.as_deref()).await;
                (j, i as usize, o)
            });
        }
    }
    let mut out: Vec<Vec<Option<Observed>>> = jobs
        .iter()
        .map(|j| vec![None; j.schedule.count as usize])
        .collect();
    let mut drain = tokio::time::interval(DRAIN_INTERVAL);
    drain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            next = set.join_next() => match next {
                None => break,
                Some(joined) => {
                    let (j, i, o) = joined.context("a probe task failed")?;
                    out[j][i] = Some(o);
                    finished[j] = Instant::now();
                    progress.step();
                }
            },
            _ = drain.tick() => {
                if let Some(k) = kernel.as_mut() {
                    k.pump();
                }
                progress.tick();
            }
        }
    }
    let out = out
        .into_iter()
        .map(|v| v.into_iter().flatten().collect())
        .collect();
    Ok((out, finished))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(addr: &str) -> Job {
        Job {
            target: 0,
            addr: addr.parse().unwrap(),
            schedule: Schedule {
                count: 2,
                interval: Duration::ZERO,
                deadline: Duration::from_secs(1),
                http: None,
            },
        }
    }

    fn seen(results: &[ConnectResult]) -> Vec<Observed> {
        results
            .iter()
            .map(|r| Observed {
                cookie: 1,
                result: r.clone(),
                elapsed: Duration::ZERO,
                syn_retransmits: None,
                http: None,
            })
            .collect()
    }

    #[test]
    fn a_host_that_answered_every_connect_of_another_target_is_not_probed_again() {
        use ConnectResult::{DeadlineHit, Established, Failed};
        let refused = Failed(libc::ECONNREFUSED);
        let jobs = [
            job("10.0.0.1:8080"),
            job("10.0.0.1:8081"),
            job("10.0.0.2:8080"),
            job("10.0.0.2:8081"),
        ];
        let observed = [
            seen(&[DeadlineHit, DeadlineHit]),
            seen(&[refused.clone(), Established]),
            seen(&[DeadlineHit, DeadlineHit]),
            // Answered in part: its SYNs went unanswered too, so no evidence of the host.
            seen(&[refused, DeadlineHit]),
        ];
        let none = vec![None; jobs.len()];
        let ((other, of), lent) = plan_other_port(&jobs, &observed, (&[], &none));
        assert_eq!(lent, [(0, 1)]);
        assert_eq!(of, [None, None, Some(0), None]);
        assert_eq!(other.len(), 1);
        assert_eq!(other[0].addr, "10.0.0.2:65535".parse().unwrap());
    }
}
