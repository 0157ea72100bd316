use super::*;

const ALL_ON: RetryPolicy = RetryPolicy {
    max_retries: 2,
    on_response_timeout: true,
    on_reset: true,
    budget_percent: 20,
    min_retry_concurrency: 3,
    grpc_status_codes: GrpcCodes::NONE,
    status_codes: StatusCodes::NONE,
};

const ALL_OFF: RetryPolicy = RetryPolicy {
    on_response_timeout: false,
    on_reset: false,
    ..ALL_ON
};

fn died(delivery: Delivery) -> Failure {
    Failure::ConnectionDied {
        delivery,
        host_died: false,
        reused: false,
    }
}

#[test]
fn connect_failures_are_always_retried() {
    assert_eq!(
        retry_allowed(Failure::ConnectFailed, false, &ALL_OFF),
        Some(RetryReason::ConnectFailed)
    );
}

#[test]
fn delivery_needs_a_baseline_and_the_kernels_count() {
    // A fresh connection: nothing ACKed (SYN excluded).
    assert_eq!(Delivery::of(Some(0), Some(0)), Delivery::NotReceived);
    assert_eq!(Delivery::of(Some(0), Some(1)), Delivery::Received);
    // A reused connection whose earlier requests took 500 bytes.
    assert_eq!(Delivery::of(Some(500), Some(500)), Delivery::NotReceived);
    assert_eq!(Delivery::of(Some(500), Some(501)), Delivery::Received);
    // No baseline, or no kernel record.
    assert_eq!(Delivery::of(None, Some(0)), Delivery::Unknown);
    assert_eq!(Delivery::of(Some(0), None), Delivery::Unknown);
}

#[test]
fn an_unacked_post_is_safe_to_retry() {
    let d = Delivery::NotReceived;
    assert_eq!(
        retry_allowed(died(d), false, &ALL_OFF),
        Some(RetryReason::UnackedRequest)
    );
    assert_eq!(
        retry_allowed(Failure::ResponseTimeout { delivery: d }, false, &ALL_OFF),
        Some(RetryReason::UnackedRequest)
    );
}

#[test]
fn a_partial_ack_is_never_safe_for_a_post() {
    let d = Delivery::Received;
    assert_eq!(retry_allowed(died(d), false, &ALL_ON), None);
    assert_eq!(
        retry_allowed(Failure::ResponseTimeout { delivery: d }, false, &ALL_ON),
        None
    );
}

#[test]
fn acked_or_unknown_requests_follow_the_idempotent_policy() {
    for d in [Delivery::Received, Delivery::Unknown] {
        let timeout = Failure::ResponseTimeout { delivery: d };
        assert_eq!(
            retry_allowed(timeout, true, &ALL_ON),
            Some(RetryReason::ResponseTimeout)
        );
        assert_eq!(retry_allowed(timeout, false, &ALL_ON), None);
        assert_eq!(retry_allowed(timeout, true, &ALL_OFF), None);
        assert_eq!(
            retry_allowed(died(d), true, &ALL_ON),
            Some(RetryReason::UpstreamReset)
        );
        assert_eq!(retry_allowed(died(d), true, &ALL_OFF), None);
    }
}

#[test]
fn a_dead_host_is_retried_for_idempotent_requests_whatever_the_policy() {
    let f = Failure::ConnectionDied {
        delivery: Delivery::Received,
        host_died: true,
        reused: true,
    };
    assert_eq!(
        retry_allowed(f, true, &ALL_OFF),
        Some(RetryReason::UpstreamReset)
    );
    assert_eq!(retry_allowed(f, false, &ALL_OFF), None);
}

#[test]
fn a_stale_keep_alive_connection_is_retried_for_idempotent_requests_on_a_fresh_one() {
    let stale = |delivery| Failure::ConnectionDied {
        delivery,
        host_died: false,
        reused: true,
    };
    for d in [Delivery::Received, Delivery::Unknown] {
        assert_eq!(
            retry_allowed(stale(d), true, &ALL_OFF),
            Some(RetryReason::StaleConnection),
            "whatever the policy: the upstream closed an idle connection"
        );
        assert_eq!(
            retry_allowed(stale(d), false, &ALL_ON),
            None,
            "a POST that may have arrived is never sent twice"
        );
    }
    assert_eq!(
        retry_allowed(stale(Delivery::NotReceived), false, &ALL_OFF),
        Some(RetryReason::UnackedRequest),
        "a POST the kernel proves unreceived is"
    );
    let budgets = Arc::new(Budgets::default());
    // The budget spent by other retries does not stop a stale-connection retry.
    let _held: Vec<_> = (0..3).map(|_| budgets.try_retry(20, 3).unwrap()).collect();
    match next_step(stale(Delivery::Unknown), attempted(0), &ALL_OFF, &budgets) {
        Step::Retry {
            reason, to, permit, ..
        } => {
            assert_eq!(reason, RetryReason::StaleConnection);
            assert_eq!(to, Where::FreshConnection);
            assert!(permit.is_none(), "outside the budget");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        next_step(stale(Delivery::Unknown), attempted(2), &ALL_OFF, &budgets),
        Step::Stop(Stop::MaxRetries)
    ));
    drop(_held);
    match next_step(Failure::ConnectFailed, attempted(0), &ALL_OFF, &budgets) {
        Step::Retry { to, .. } => assert_eq!(to, Where::Elsewhere),
        other => panic!("{other:?}"),
    }
}

#[test]
fn final_failures_are_never_retried() {
    assert_eq!(retry_allowed(Failure::Final, true, &ALL_ON), None);
}

fn attempted(retries: u32) -> Attempted {
    Attempted {
        refused: 0,
        free_refusals: 0,
        idempotent: true,
        resendable: true,
        retries,
    }
}

#[test]
fn next_step_checks_resendable_then_max_retries_then_the_budget() {
    let budgets = Arc::new(Budgets::default());
    let f = Failure::ConnectFailed;
    assert!(matches!(
        next_step(Failure::Final, attempted(0), &ALL_ON, &budgets),
        Step::Stop(Stop::NotRetryable)
    ));
    let gone = Attempted {
        resendable: false,
        ..attempted(0)
    };
    assert!(matches!(
        next_step(f, gone, &ALL_ON, &budgets),
        Step::Stop(Stop::NotResendable)
    ));
    assert!(matches!(
        next_step(f, attempted(2), &ALL_ON, &budgets),
        Step::Stop(Stop::MaxRetries)
    ));
    // No request in flight: the floor of 3 concurrent retries.
    let held: Vec<_> = (0..3)
        .map(|_| match next_step(f, attempted(0), &ALL_ON, &budgets) {
            Step::Retry { reason, permit, .. } => {
                assert_eq!(reason, RetryReason::ConnectFailed);
                permit.expect("a connect-failure retry holds a budget permit")
            }
            other => panic!("expected a retry, got {other:?}"),
        })
        .collect();
    assert!(matches!(
        next_step(f, attempted(0), &ALL_ON, &budgets),
        Step::Stop(Stop::BudgetSpent)
    ));
    drop(held);
    assert!(matches!(
        next_step(f, attempted(0), &ALL_ON, &budgets),
        Step::Retry { .. }
    ));
}

const GOAWAY: Failure = Failure::Refused { graceful: true };
const SHED: Failure = Failure::Refused { graceful: false };

#[test]
fn a_refused_stream_is_retried_whatever_the_method_on_another_then_a_new_connection_outside_the_budget()
 {
    for f in [GOAWAY, SHED] {
        assert_eq!(
            retry_allowed(f, false, &ALL_OFF),
            Some(RetryReason::RefusedStream)
        );
    }
    // A spent budget does not stop it: a graceful upstream restart refuses every stream in
    // flight at once.
    let budgets = Arc::new(Budgets::default());
    let attempted = Attempted {
        idempotent: false,
        resendable: true,
        retries: 0,
        refused: 0,
        free_refusals: 0,
    };
    let policy = RetryPolicy {
        budget_percent: 0,
        min_retry_concurrency: 0,
        ..ALL_OFF
    };
    for f in [GOAWAY, SHED] {
        match next_step(f, attempted, &policy, &budgets) {
            Step::Retry {
                reason: RetryReason::RefusedStream,
                to: Where::AnotherConnection,
                permit: None,
                counted,
            } => assert_eq!(counted, f == SHED, "{f:?}"),
            other => panic!("{other:?}"),
        }
    }
    // Refused again: a connection of its own.
    let again = Attempted {
        retries: 1,
        refused: 1,
        free_refusals: 1,
        ..attempted
    };
    match next_step(GOAWAY, again, &policy, &budgets) {
        Step::Retry {
            to: Where::FreshConnection,
            counted: false,
            ..
        } => {}
        other => panic!("{other:?}"),
    }
}

/// An upstream shedding load refuses again: no new connection (it would not help, and a
/// connection per refusal is what an overloaded upstream least needs), but the endpoint's
/// connections as they are, as an ordinary retry: counted, and within the budget.
#[test]
fn a_stream_shed_twice_is_retried_on_the_same_connections_within_the_budget() {
    let shed_once = Attempted {
        idempotent: false,
        resendable: true,
        retries: 1,
        refused: 1,
        free_refusals: 0,
    };
    let budgets = Arc::new(Budgets::default());
    match next_step(SHED, shed_once, &ALL_ON, &budgets) {
        Step::Retry {
            reason: RetryReason::RefusedStream,
            to: Where::AnotherConnection,
            permit: Some(_),
            counted: true,
        } => {}
        other => panic!("{other:?}"),
    }
    let no_budget = RetryPolicy {
        budget_percent: 0,
        min_retry_concurrency: 0,
        ..ALL_ON
    };
    assert!(matches!(
        next_step(SHED, shed_once, &no_budget, &budgets),
        Step::Stop(Stop::BudgetSpent)
    ));
    // A graceful GOAWAY's second refusal still gets a connection of its own, free.
    assert!(matches!(
        next_step(
            GOAWAY,
            Attempted {
                free_refusals: 1,
                ..shed_once
            },
            &no_budget,
            &budgets
        ),
        Step::Retry {
            to: Where::FreshConnection,
            permit: None,
            ..
        }
    ));
}

#[test]
fn two_refusals_by_a_graceful_goaway_are_outside_max_retries_unless_it_is_zero() {
    let budgets = Arc::new(Budgets::default());
    let policy = RetryPolicy {
        budget_percent: 0,
        min_retry_concurrency: 0,
        ..ALL_OFF
    };
    // Retries already spent on other failures: a GOAWAY's refusals are still retried, a
    // REFUSED_STREAM's (load shedding) is not.
    let spent = Attempted {
        idempotent: true,
        resendable: true,
        retries: policy.max_retries,
        refused: 0,
        free_refusals: 0,
    };
    assert!(matches!(
        next_step(GOAWAY, spent, &policy, &budgets),
        Step::Retry {
            to: Where::AnotherConnection,
            counted: false,
            ..
        }
    ));
    assert!(matches!(
        next_step(SHED, spent, &policy, &budgets),
        Step::Stop(Stop::MaxRetries)
    ));
    let refused_once = Attempted {
        retries: policy.max_retries + 1,
        refused: 1,
        free_refusals: 1,
        ..spent
    };
    assert!(matches!(
        next_step(GOAWAY, refused_once, &policy, &budgets),
        Step::Retry {
            to: Where::FreshConnection,
            counted: false,
            ..
        }
    ));
    // max_retries = 0 turns every retry off.
    let none = RetryPolicy {
        max_retries: 0,
        ..policy
    };
    let first = Attempted {
        retries: 0,
        ..spent
    };
    assert!(matches!(
        next_step(GOAWAY, first, &none, &budgets),
        Step::Stop(Stop::MaxRetries)
    ));
    // Refused a third time, as the first stream of a new connection: the upstream is going
    // away. An ordinary retry now: counted...
    let third = Attempted {
        retries: FREE_REFUSALS + policy.max_retries,
        refused: FREE_REFUSALS,
        free_refusals: FREE_REFUSALS,
        ..spent
    };
    assert!(matches!(
        next_step(GOAWAY, third, &policy, &budgets),
        Step::Stop(Stop::MaxRetries)
    ));
    // ... to another endpoint, within the budget.
    let room = RetryPolicy {
        max_retries: 1,
        ..policy
    };
    let third = Attempted {
        retries: FREE_REFUSALS,
        ..third
    };
    assert!(matches!(
        next_step(GOAWAY, third, &room, &budgets),
        Step::Stop(Stop::BudgetSpent)
    ));
    let budget = RetryPolicy {
        budget_percent: 100,
        min_retry_concurrency: 10,
        ..room
    };
    assert!(matches!(
        next_step(GOAWAY, third, &budget, &budgets),
        Step::Retry {
            to: Where::Elsewhere,
            permit: Some(_),
            counted: true,
            ..
        }
    ));
}

#[test]
fn grpc_statuses_are_retried_only_when_listed() {
    let listed = RetryPolicy {
        grpc_status_codes: GrpcCodes::default().with(GrpcCode::UNAVAILABLE),
        ..ALL_OFF
    };
    let f = Failure::GrpcStatus(GrpcCode::UNAVAILABLE);
    assert_eq!(
        retry_allowed(f, false, &listed),
        Some(RetryReason::GrpcStatus)
    );
    assert_eq!(retry_allowed(f, false, &ALL_OFF), None);
    let other = Failure::GrpcStatus(GrpcCode::INTERNAL);
    assert_eq!(retry_allowed(other, false, &listed), None);
}

#[test]
fn a_listed_response_status_is_retried_elsewhere_for_idempotent_requests_within_the_budget() {
    let listed = RetryPolicy {
        status_codes: StatusCodes::NONE.with(502).with(503),
        ..ALL_OFF
    };
    let f = Failure::UpstreamStatus(503);
    assert_eq!(
        retry_allowed(f, true, &listed),
        Some(RetryReason::UpstreamStatus)
    );
    // The upstream answered: it had the request, which a POST must not repeat.
    assert_eq!(retry_allowed(f, false, &listed), None);
    assert_eq!(retry_allowed(f, true, &ALL_ON), None, "not listed");
    assert_eq!(
        retry_allowed(Failure::UpstreamStatus(504), true, &listed),
        None
    );
    let budgets = Arc::new(Budgets::default());
    match next_step(f, attempted(0), &listed, &budgets) {
        Step::Retry {
            reason,
            to,
            permit,
            counted,
        } => {
            assert_eq!(reason, RetryReason::UpstreamStatus);
            assert_eq!(to, Where::Elsewhere);
            assert!(
                permit.is_some() && counted,
                "an ordinary retry, within the budget"
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        next_step(f, attempted(2), &listed, &budgets),
        Step::Stop(Stop::MaxRetries)
    ));
    let _held: Vec<_> = (0..3).map(|_| budgets.try_retry(20, 3).unwrap()).collect();
    assert!(matches!(
        next_step(f, attempted(0), &listed, &budgets),
        Step::Stop(Stop::BudgetSpent)
    ));
    // Asked before an endpoint is picked: everything but the budget, with no permit taken.
    assert!(
        may_retry(f, attempted(0), &listed),
        "the budget is not asked"
    );
    assert!(!may_retry(f, attempted(2), &listed));
    let post = Attempted {
        idempotent: false,
        ..attempted(0)
    };
    assert!(!may_retry(f, post, &listed));
    let gone = Attempted {
        resendable: false,
        ..attempted(0)
    };
    assert!(!may_retry(f, gone, &listed));
}

#[test]
fn a_status_set_holds_only_client_and_server_errors() {
    let set = StatusCodes::NONE
        .with(400)
        .with(503)
        .with(599)
        .with(302)
        .with(600);
    assert!(set.contains(400) && set.contains(503) && set.contains(599));
    assert!(!set.contains(302) && !set.contains(600) && !set.contains(504));
    assert!(!set.contains(0) && !set.contains(u16::MAX));
    assert!(StatusCodes::NONE.is_empty() && !set.is_empty());
    assert!(StatusCodes::NONE.with(200).is_empty());
}
