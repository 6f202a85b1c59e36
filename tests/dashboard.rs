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
    // Kafka statistics every second for consumer lag and stalled partitions.
    let sink = SmtpSink::start().await;
    sink.control(serde_json::json!({ "rcpt_replies": { "refused@example.org": "550 5.1.1 no" } }));
    let app = TestApp::spawn(&sink, &[("KAFKA_STATISTICS_INTERVAL", "1s")]).await;
    let mut batch = batch("dashboard", 3, 1);
    batch.as_array_mut().unwrap().push(serde_json::json!({
        "Subject": "refused", "Body": "x", "Addresses": ["refused@example.org"], "Token": "t"
    }));
    assert_eq!(app.post("/post", batch.to_string()).await.0, 202);
    app.wait_all_final(4, LONG).await;

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
