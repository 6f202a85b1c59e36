//! The reputation brake (issue 20) against the real binary: a batch to mostly dead addresses,
//! accepted by the test relay and then bounced by DSNs (Postfix's, tests/fixtures/feedback/)
//! delivered to the feedback listener, pauses the deployment once the hard-bounce rate reaches
//! its limit; nothing more is sent until `POST /resume`, and then the rest goes out without the
//! brake tripping again on the evidence it already acted on. A batch below the limit is not
//! paused.

mod common;
#[path = "common/inbound.rs"]
mod inbound;

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use common::*;
use inbound::*;
use serde_json::{Value, json};

const LONG: Duration = Duration::from_secs(90);
const SECRET: &str = "brake-test-secret-0123456789";
const BOUNCE_DOMAIN: &str = "bounce.mailsender.test";

struct Braked {
    app: TestApp,
    /// The feedback listener's port.
    port: u16,
}

/// The service with the listener on and the brake judging after 10 recipients, every 200 ms;
/// 5 letters a second, so the test can watch the batch go out.
async fn start(sink: &SmtpSink, extra: &[(&str, &str)]) -> Braked {
    let port = free_port();
    let listener = format!("127.0.0.1:{port}");
    let topic = unique("brake-feedback-");
    let mut settings = vec![
        ("BOUNCE_DOMAIN", BOUNCE_DOMAIN),
        ("BOUNCE_SECRET", SECRET),
        ("FEEDBACK_SMTP_ADDR", listener.as_str()),
        ("KAFKA_TOPIC_FEEDBACK", topic.as_str()),
        ("SMTP_RATE_LIMIT_MAX_LETTERS", "5"),
        ("SMTP_MAX_SENDERS", "2"),
        ("BRAKE_MIN_SENDS", "10"),
        ("BRAKE_INTERVAL", "200ms"),
    ];
    settings.extend_from_slice(extra);
    let app = TestApp::spawn(sink, &settings).await;
    Braked { app, port }
}

/// `count` letters of one recipient each; those whose index `dead` picks go to addresses that
/// a later DSN says do not exist.
fn letters(tag: &str, count: usize, dead: impl Fn(usize) -> bool) -> (Value, HashSet<String>) {
    let mut dead_addresses = HashSet::new();
    let mailings: Vec<Value> = (0..count)
        .map(|i| {
            let address = if dead(i) {
                let address = format!("{tag}-gone-{i}@dead.example");
                dead_addresses.insert(address.clone());
                address
            } else {
                format!("{tag}-reader-{i}@example.org")
            };
            json!({ "Subject": format!("{tag} {i}"), "Body": "<p>Hello</p>", "Addresses": [address], "Token": format!("t-{tag}-{i}") })
        })
        .collect();
    (Value::Array(mailings), dead_addresses)
}

/// Bounces every message the relay took for a dead address, once: the relay's DSN, mailed back
/// to the message's signed return path. Returns how many it delivered now.
async fn bounce_new(b: &Braked, sink: &SmtpSink, dead: &HashSet<String>, bounced: &mut HashSet<String>) -> usize {
    let mut delivered = 0;
    for message in sink.received() {
        let Some(address) = message.rcpt_tos.first() else { continue };
        if dead.contains(address) && bounced.insert(address.clone()) {
            let (rcpt, end) = deliver(b.port, &message.mail_from, &hard_bounce_for(address)).await;
            assert!(rcpt.starts_with("250") && end.starts_with("250"), "{rcpt} / {end}");
            delivered += 1;
        }
    }
    delivered
}

async fn index(app: &TestApp) -> Value {
    let (status, body) = app.get("/").await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

async fn metric(app: &TestApp, name: &str) -> Option<f64> {
    metric_value(&app.get("/metrics").await.1, name)
}

const BOUNCE_RATE: &str = r#"mailsender_brake_rate{kind="hard_bounce"}"#;

#[tokio::test]
async fn mostly_dead_addresses_pause_the_deployment_until_resumed() {
    let sink = SmtpSink::start().await;
    let b = start(&sink, &[]).await;
    // 40 letters, four in five to dead addresses: far over the default 5 % limit.
    let (batch, dead) = letters("dead", 40, |i| i % 5 != 0);
    assert_eq!(b.app.post("/post", batch.to_string()).await.0, 202);

    // Bounce what arrives until the brake pauses sending.
    let mut bounced = HashSet::new();
    let started = Instant::now();
    let paused = loop {
        bounce_new(&b, &sink, &dead, &mut bounced).await;
        let view = index(&b.app).await;
        if view["paused"] == true {
            break view;
        }
        assert!(started.elapsed() < LONG, "not paused; {} sent, {} bounced", sink.received().len(), bounced.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(paused["pause"]["cause"], "brake", "{paused:#}");
    let reason = paused["pause"]["reason"].as_str().unwrap();
    assert!(reason.starts_with("reputation brake: hard-bounce rate"), "{reason}");
    assert!(reason.contains("BRAKE_MAX_BOUNCE_RATE 5.00 %"), "{reason}");
    assert!(paused["pause"]["by"].as_str().unwrap().starts_with("brake@"), "{paused:#}");
    let control = b.app.raw_documents("letters_control").await;
    let stored = control.iter().find(|d| d.get_str("_id") == Ok("dispatch")).expect("the control document");
    assert_eq!((stored.get_str("cause"), stored.get_str("reason")), (Ok("brake"), Ok(reason)));

    // Sends already under way finish; then nothing more goes out, however long it waits.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let at_pause = sink.received().len();
    assert!(at_pause >= 10, "the brake judged only after BRAKE_MIN_SENDS recipients: {at_pause} sent");
    assert!(at_pause < 30, "paused early in the batch, not at its end: {at_pause} of 40 sent");
    // The in-flight ones bounce too: old evidence, which must not count after the resume.
    bounce_new(&b, &sink, &dead, &mut bounced).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(sink.received().len(), at_pause, "a letter was sent while the brake held");
    let awaiting = b.app.letters().await.iter().filter(|l| l.status == mailsender::model::Status::Awaiting).count();
    assert_eq!(awaiting, 40 - at_pause, "the rest waits");
    let text = b.app.get("/metrics").await.1;
    assert_eq!(metric_value(&text, "mailsender_brake_paused"), Some(1.0), "{text}");
    assert_eq!(metric_value(&text, "mailsender_brake_trips_total"), Some(1.0), "{text}");
    assert!(metric_value(&text, BOUNCE_RATE).unwrap() >= 0.05, "{text}");
    assert_eq!(metric_value(&text, r#"mailsender_brake_limit{kind="hard_bounce"}"#), Some(0.05), "{text}");

    // The operator resumes: the rest is sent, and the bounces already counted do not trip the
    // brake again (the letters sent since the resume carry no bounce).
    let (status, resumed) = b.app.post("/resume", "").await;
    assert_eq!(status, 200, "{resumed}");
    assert_eq!(resumed["paused"], false, "{resumed}");
    assert!(resumed["resumed_ms"].as_i64().unwrap() > 0, "{resumed}");
    sink.wait_for_count(40, LONG).await;
    b.app.wait_all_final(40, LONG).await;
    // Several evaluations after the last send, on a window of at least BRAKE_MIN_SENDS.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let view = index(&b.app).await;
    assert_eq!(view["paused"], false, "{view:#}");
    assert_eq!(view["pause"], Value::Null, "{view:#}");
    let text = b.app.get("/metrics").await.1;
    assert_eq!(metric_value(&text, "mailsender_brake_trips_total"), Some(1.0), "{text}");
    assert!(metric_value(&text, "mailsender_brake_window_recipients").unwrap() >= 10.0, "{text}");
    assert_eq!(metric_value(&text, BOUNCE_RATE), Some(0.0), "{text}");
}

#[tokio::test]
async fn a_batch_below_the_limit_is_not_paused() {
    let sink = SmtpSink::start().await;
    // 3 dead addresses of 20: 15 %, under a 20 % limit, on a judged sample (20 recipients, 3
    // events): only the limit keeps it going.
    let b = start(&sink, &[("BRAKE_MAX_BOUNCE_RATE", "20%")]).await;
    let (batch, dead) = letters("fine", 20, |i| i % 7 == 3);
    assert_eq!(dead.len(), 3);
    assert_eq!(b.app.post("/post", batch.to_string()).await.0, 202);
    sink.wait_for_count(20, LONG).await;
    b.app.wait_all_final(20, LONG).await;
    let mut bounced = HashSet::new();
    assert_eq!(bounce_new(&b, &sink, &dead, &mut bounced).await, 3);

    // The brake has seen all three bounces (15 % of 20) and did not pause.
    wait_for("the brake to count the bounces", LONG, || async {
        (metric(&b.app, BOUNCE_RATE).await == Some(0.15)).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let view = index(&b.app).await;
    assert_eq!(view["paused"], false, "{view:#}");
    assert_eq!(metric(&b.app, "mailsender_brake_trips_total").await, Some(0.0));

    // And sending goes on.
    let (more, _) = letters("after", 5, |_| false);
    assert_eq!(b.app.post("/post", more.to_string()).await.0, 202);
    sink.wait_for_count(25, LONG).await;
}
