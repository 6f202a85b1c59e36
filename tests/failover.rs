//! Several relays in `SMTP_HOST` (issue 22, "a relay that is down"): a relay that fails is left
//! for the next one without costing letters an attempt, skipped while its breaker is open, and
//! taken back once its probe succeeds; no letter is lost or sent twice.

#[path = "common/chaos.rs"]
mod chaos;
mod common;

use std::time::Duration;

use chaos::{ChaosSink, rcpt_counts};
use common::*;
use mailsender::model::Status;
use serde_json::{Value, json};

const LONG: Duration = Duration::from_secs(90);

async fn ready(app: &TestApp) -> (u16, Value) {
    let (status, body) = app.get("/ready").await;
    (status, serde_json::from_str(&body).unwrap_or(Value::String(body)))
}

async fn metric(app: &TestApp, name: &str) -> f64 {
    metric_value(&app.get("/metrics").await.1, name).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_relay_killed_mid_run_is_left_for_the_next_and_taken_back_after_its_probe() {
    let mut a = ChaosSink::start().await;
    let b = SmtpSink::start().await;
    let hosts = format!("127.0.0.1:{},127.0.0.1:{}", a.port, b.port);
    let relay_a = format!("127.0.0.1:{}", a.port);
    let app = TestApp::spawn(
        &b,
        &[
            ("SMTP_HOST", hosts.as_str()),
            // 20 letters a second, so the run lasts long enough to kill and restart A within it.
            ("SMTP_RATE_LIMIT_MAX_LETTERS", "20"),
            ("SMTP_RATE_LIMIT_PERIOD", "1s"),
            ("SMTP_RELAY_BREAKER_FAILURES", "3"),
            ("SMTP_RELAY_BREAKER_COOLDOWN", "2s"),
        ],
    )
    .await;
    let (status, body) = ready(&app).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["smtp_relays"][0]["relay"], relay_a.as_str(), "{body}");
    assert_eq!(body["smtp_relays"][0]["state"], "closed", "{body}");

    let letters = 200;
    let batch = batch("fo", letters, 1);
    let (status, body) = app.post("/post", batch.to_string()).await;
    assert_eq!(status, 202, "{body}");

    // The most preferred relay takes the letters while it is up.
    wait_for("A to receive 30 letters", LONG, || async { (a.received().len() >= 30).then_some(()) }).await;
    assert!(b.received().is_empty(), "B is only the fallback: {} letters", b.received().len());
    a.kill();
    let at_kill = a.received().len();
    let b_at_kill = b.received().len();

    // Letters go on through B, and /ready stays 200 showing A skipped.
    wait_for("B to receive 30 letters after A was killed", LONG, || async {
        (b.received().len() >= b_at_kill + 30).then_some(())
    })
    .await;
    let during = wait_for("/ready to show A's breaker open", Duration::from_secs(15), || async {
        let (status, body) = ready(&app).await;
        (body["smtp_relays"][0]["state"] == "open").then_some((status, body))
    })
    .await;
    assert_eq!(during.0, 200, "ready while B is up: {}", during.1);
    assert_eq!(during.1["checks"]["smtp"], "ok", "{}", during.1);
    assert_ne!(during.1["smtp_relays"][0]["reachable"], "ok", "{}", during.1);
    assert_eq!(during.1["smtp_relays"][1]["state"], "closed", "{}", during.1);
    let failovers = metric(&app, &format!("mailsender_smtp_relay_failovers_total{{relay=\"{relay_a}\"}}")).await;
    assert!(failovers >= 3.0, "the failovers from A are counted: {failovers}");
    assert_eq!(metric(&app, &format!("mailsender_smtp_relay_state{{relay=\"{relay_a}\"}}")).await, 2.0);
    assert_eq!(a.received().len(), at_kill, "nothing reached the dead relay");

    // A comes back on the same port: after its cool-down a probe finds it and traffic returns.
    a.restart().await;
    wait_for("A to receive letters again after its restart", LONG, || async {
        (a.received().len() >= at_kill + 10).then_some(())
    })
    .await;

    let done = app.wait_all_final(letters, LONG).await;
    let (a_got, b_got) = (a.received(), b.received());
    let retried: Vec<_> = done.iter().filter(|l| l.attempts != 1).map(|l| (l.attempts, &l.subject)).collect();
    println!(
        "A: {at_kill} before the kill, {} after its restart; B: {}; letters with a second attempt: {retried:?}",
        a_got.len() - at_kill,
        b_got.len()
    );
    assert!(done.iter().all(|l| l.status == Status::Sent), "every letter sent, none error");
    // Each letter exactly once over both relays (counted, not a set).
    let counts = rcpt_counts(a_got.iter().chain(&b_got));
    assert_eq!(counts.len(), letters, "every letter reached a relay");
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "letters received more than once: {twice:?}");
    assert_eq!(a_got.len() + b_got.len(), letters);
    // Moving to B cost nothing. Only a letter whose message was on the wire to A when it died
    // (one per worker at most) is retried as any failure after the data is: it may have arrived.
    assert!(retried.len() <= 4 && retried.iter().all(|(n, _)| *n == 2), "attempts spent by the failover: {retried:?}");
    let b_addresses: Vec<&String> = b_got.iter().flat_map(|m| &m.rcpt_tos).collect();
    let moved_in_one =
        done.iter().filter(|l| l.attempts == 1 && l.delivered.iter().any(|d| b_addresses.contains(&d))).count();
    assert!(moved_in_one >= 30, "letters moved to B in their first attempt: {moved_in_one}");

    let (status, body) = ready(&app).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["smtp_relays"][0]["state"], "closed", "A in use again: {body}");
    assert_eq!(metric(&app, &format!("mailsender_smtp_relay_state{{relay=\"{relay_a}\"}}")).await, 0.0);
    assert!(app.log().contains("probing it"), "the way back was a probe");
}

/// A relay that answers 421 (closing the channel) at the greeting or to MAIL is left for the next
/// one at once: nothing reaches it, no letter spends a second attempt.
#[tokio::test(flavor = "multi_thread")]
async fn a_relay_answering_421_is_left_for_the_next_without_an_attempt() {
    for (control, lockstep) in [
        (json!({ "greeting": "421 4.3.2 Service shutting down" }), false),
        (json!({ "mail_reply": "421 4.3.2 Service not available, closing transmission channel" }), false),
        (json!({ "mail_reply": "421 4.3.2 Service not available, closing transmission channel" }), true),
    ] {
        let a = if lockstep { SmtpSink::start_lockstep().await } else { SmtpSink::start().await };
        a.control(control.clone());
        let b = SmtpSink::start().await;
        let hosts = format!("127.0.0.1:{},127.0.0.1:{}", a.port, b.port);
        let relay_a = format!("127.0.0.1:{}", a.port);
        let app = TestApp::spawn(&b, &[("SMTP_HOST", hosts.as_str()), ("SMTP_RELAY_BREAKER_COOLDOWN", "1h")]).await;
        let letters = 20;
        let (status, body) = app.post("/post", batch("f421", letters, 2).to_string()).await;
        assert_eq!(status, 202, "{body}");
        let done = app.wait_all_final(letters, LONG).await;
        for letter in &done {
            assert_eq!(letter.status, Status::Sent, "{control}: {letter:?}");
            assert_eq!(letter.attempts, 1, "{control}: {letter:?}");
        }
        assert!(a.received().is_empty(), "{control}");
        let counts = rcpt_counts(&b.received());
        assert_eq!(counts.len(), letters * 2, "{control}");
        assert!(counts.values().all(|n| *n == 1), "{control}: {counts:?}");
        let failovers = metric(&app, &format!("mailsender_smtp_relay_failovers_total{{relay=\"{relay_a}\"}}")).await;
        assert!(failovers >= 3.0, "{control}: {failovers} failovers");
        let (status, body) = ready(&app).await;
        assert_eq!(status, 200, "{control}: {body}");
        assert_eq!(body["smtp_relays"][0]["state"], "open", "{control}: {body}");
        assert_eq!(body["smtp_relays"][0]["reachable"], "ok", "{control}: {body}");
    }
}
