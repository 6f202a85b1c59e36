//! The Grafana dashboard and the Prometheus alert rules in `deploy/` name only metrics that the
//! live service exposes. (`scripts/check-artifacts.sh` checks their PromQL with promtool; this
//! checks the names, which promtool cannot know.)

mod common;

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use common::*;

const LONG: Duration = Duration::from_secs(60);
const MAILGUN_KEY: &str = "key-dashboard-signing-0123456789abcdef";

/// A Mailgun webhook body signed now with [`MAILGUN_KEY`].
fn mailgun_body(token: &str, data: serde_json::Value) -> serde_json::Value {
    use hmac::Mac as _;
    let timestamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(MAILGUN_KEY.as_bytes()).unwrap();
    mac.update(format!("{timestamp}{token}").as_bytes());
    let signature: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
    serde_json::json!({
        "signature": { "timestamp": timestamp.to_string(), "token": token, "signature": signature },
        "event-data": data,
    })
}

/// Every `mailsender_…` metric name in a file.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("mailsender_") {
        let before = text.len() - rest.len() + at;
        let starts_word = text[..before].chars().next_back().is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_'));
        let len = rest[at..]
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(rest.len() - at);
        if starts_word {
            names.insert(rest[at..at + len].to_owned());
        }
        rest = &rest[at + len..];
    }
    names
}

/// The sample names in Prometheus text: what PromQL can select (`_total`, `_bucket`, ...).
fn exposed(metrics: &str) -> BTreeSet<String> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap_or_default().to_owned())
        .collect()
}

#[test]
fn finds_metric_names_in_text() {
    let names = metric_names(
        r#"sum(rate(mailsender_letters_sent_total{job=~"$job"}[5m])) / xmailsender_no mailsender_letters"#,
    );
    assert_eq!(names, BTreeSet::from(["mailsender_letters_sent_total".to_owned(), "mailsender_letters".to_owned()]));
    assert_eq!(
        exposed("# TYPE mailsender_letters gauge\nmailsender_letters{status=\"sent\"} 3\nmailsender_x_total 1\n"),
        BTreeSet::from(["mailsender_letters".to_owned(), "mailsender_x_total".to_owned()])
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn every_metric_of_the_dashboard_and_the_alert_rules_is_exposed() {
    let files = ["deploy/grafana/mailsender.json", "deploy/prometheus/mailsender-alerts.yaml"];
    let mut wanted: Vec<(String, &str)> = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(repo_root().join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        let names = metric_names(&text);
        assert!(names.len() >= 5, "{file} names only {names:?}: wrong file?");
        wanted.extend(names.into_iter().map(|name| (name, file)));
    }

    // Labelled families appear with their first sample: a refused letter for the failure reasons,
    // Kafka statistics every second for consumer lag and stalled partitions, relay webhooks for
    // the feedback events and the webhooks' refusals and ignored events (below).
    let sink = SmtpSink::start().await;
    sink.control(serde_json::json!({ "rcpt_replies": { "refused@example.org": "550 5.1.1 no" } }));
    let public = free_port();
    let app = TestApp::spawn(
        &sink,
        &[
            ("KAFKA_STATISTICS_INTERVAL", "1s"),
            ("PUBLIC_HTTP_ADDR", &format!("127.0.0.1:{public}")),
            ("MAILGUN_WEBHOOK_SIGNING_KEY", MAILGUN_KEY),
            ("KAFKA_TOPIC_FEEDBACK", &unique("dashboard-feedback-")),
        ],
    )
    .await;
    let mut batch = batch("dashboard", 3, 1);
    batch.as_array_mut().unwrap().push(serde_json::json!({
        "Subject": "refused", "Body": "x", "Addresses": ["refused@example.org"], "Token": "t"
    }));
    assert_eq!(app.post("/post", batch.to_string()).await.0, 202);
    let letters = app.wait_all_final(4, LONG).await;

    // Mailgun's webhook, three times: forged (a bad signature: refused), about no letter of ours
    // (ignored), and a complaint about a letter sent here (a feedback event).
    let url = format!("http://127.0.0.1:{public}/webhooks/mailgun");
    let sent = letters.iter().find(|l| l.status == mailsender::model::Status::Sent).expect("a letter sent");
    let complaint = |recipient: &str, letter_id: Option<String>| serde_json::json!({ "event": "complained", "recipient": recipient, "user-variables": { "letter_id": letter_id } });
    let mut forged =
        mailgun_body("token-forged-01234567890123456789012345678901234567", complaint("a@example.org", None));
    forged["signature"]["signature"] = serde_json::json!("00".repeat(32));
    let requests = [
        (forged, 403),
        (mailgun_body("token-nobody-01234567890123456789012345678901234567", complaint("a@example.org", None)), 200),
        (
            mailgun_body(
                "token-letter-01234567890123456789012345678901234567",
                complaint(&sent.addresses[0], Some(sent.id.to_hex())),
            ),
            200,
        ),
    ];
    for (body, expected) in requests {
        let response = reqwest::Client::new()
            .post(&url)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        assert_eq!(status, expected, "{body}: {}", response.text().await.unwrap_or_default());
    }

    // Wait (bounded) for the families that appear late, then name every one still missing.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (text, missing) = loop {
        let (status, text) = app.get("/metrics").await;
        assert_eq!(status, 200, "{text}");
        let have = exposed(&text);
        let missing: Vec<String> = wanted
            .iter()
            .filter(|(name, _)| !have.contains(name))
            .map(|(name, file)| format!("{name} (in {file})"))
            .collect();
        if missing.is_empty() || Instant::now() > deadline {
            break (text, missing);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(missing.is_empty(), "not in the live /metrics:\n  {}\n\n/metrics:\n{text}", missing.join("\n  "));
}
