//! SMTP as real relays speak it, against the test server given their habits: recipient caps
//! answered with 452/552, sessions left open, idle disconnects, throttle replies, AUTH only over
//! TLS, line limits, internationalised addresses.

mod common;

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use common::*;
use mailsender::model::Status;
use serde_json::{Value, json};

const LONG: Duration = Duration::from_secs(60);

fn mailing(subject: &str, body: &str, addresses: &[String]) -> Value {
    json!({ "Subject": subject, "Body": body, "Addresses": addresses, "Token": format!("token-{subject}") })
}

fn addresses(tag: &str, count: usize) -> Vec<String> {
    (0..count).map(|i| format!("{tag}-{i}@example.org")).collect()
}

fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64()
}

/// One letter to 600 recipients through a server that caps each transaction: every address is
/// reached once, in one attempt, within seconds, and no transaction is above `most`.
async fn six_hundred_recipients(control: Value, overrides: &[(&str, &str)], most: usize) {
    let sink = SmtpSink::start().await;
    sink.control(control);
    let app = TestApp::spawn(&sink, overrides).await;
    let all = addresses("cap", 600);
    let started = Instant::now();
    let (status, body) = app.post("/post", json!([mailing("six hundred", "<p>hi</p>", &all)]).to_string()).await;
    assert_eq!(status, 202, "{body}");
    let letters = app.wait_all_final(1, LONG).await;
    let elapsed = started.elapsed();
    let letter = &letters[0];
    assert_eq!(letter.status, Status::Sent, "{letter:?}");
    assert_eq!(letter.attempts, 1, "the cap costs no attempt: {:?}", letter.last_reply);
    assert_eq!(letter.delivered.len(), 600);
    assert!(letter.rejected.is_empty(), "{:?}", letter.rejected);

    let received = sink.received();
    let mut counts: HashMap<String, usize> = HashMap::new();
    for message in &received {
        assert!(message.rcpt_tos.len() <= most, "a transaction of {} recipients", message.rcpt_tos.len());
        for rcpt in &message.rcpt_tos {
            *counts.entry(rcpt.to_lowercase()).or_default() += 1;
        }
    }
    assert_eq!(counts.len(), 600, "every recipient reached");
    assert!(counts.values().all(|n| *n == 1), "a recipient got the letter twice");
    let ids: HashSet<&str> = received.iter().filter_map(|m| m.header("Message-ID")).collect();
    assert_eq!(ids.len(), 1, "every chunk carries the same message: {ids:?}");
    assert!(elapsed < Duration::from_secs(20), "took {elapsed:?}");
    println!("600 recipients in {} transactions, {elapsed:?}", received.len());
}

#[tokio::test(flavor = "multi_thread")]
async fn recipients_over_a_452_cap_go_in_the_next_transaction_at_once() {
    six_hundred_recipients(
        json!({ "max_recipients": 100, "cap_reply": "452 4.5.3 Too many recipients" }),
        &[("SMTP_MAX_RECIPIENTS", "1000")],
        100,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn recipients_over_a_552_cap_go_in_the_next_transaction_at_once() {
    six_hundred_recipients(
        json!({ "max_recipients": 100, "cap_reply": "552 5.5.3 Too many recipients" }),
        &[("SMTP_MAX_RECIPIENTS", "1000")],
        100,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn recipients_go_in_chunks_of_smtp_max_recipients() {
    six_hundred_recipients(json!({}), &[("SMTP_MAX_RECIPIENTS", "50")], 50).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_letter_leaves_the_session_clean_for_the_next() {
    // One worker, so every letter uses the same kept connection.
    let sink = SmtpSink::start().await;
    sink.control(json!({ "rcpt_replies": { "nobody@example.org": "550 5.1.1 No such user" } }));
    let app = TestApp::spawn(&sink, &[("SMTP_MAX_SENDERS", "1")]).await;
    let refused = json!([mailing("refused", "<p>x</p>", &["nobody@example.org".to_owned()])]);
    assert_eq!(app.post("/post", refused.to_string()).await.0, 202);
    app.wait_all_final(1, LONG).await;

    let started = Instant::now();
    let good: Vec<Value> =
        (0..3).map(|i| mailing(&format!("good {i}"), "<p>y</p>", &addresses(&format!("g{i}"), 1))).collect();
    assert_eq!(app.post("/post", Value::Array(good).to_string()).await.0, 202);
    let letters = app.wait_all_final(4, LONG).await;
    let elapsed = started.elapsed();
    for letter in &letters {
        if letter.subject == "refused" {
            assert_eq!(letter.status, Status::Error);
            assert!(letter.error.as_deref().unwrap_or_default().contains("550"), "{:?}", letter.error);
        } else {
            assert_eq!(letter.status, Status::Sent, "{letter:?}");
            assert_eq!(letter.attempts, 1, "{}: {:?}", letter.subject, letter.last_reply);
        }
    }
    assert_eq!(sink.received().len(), 3);
    assert!(elapsed < Duration::from_secs(8), "the good letters took {elapsed:?}");
    let lines = sink.client_lines();
    let connections: HashSet<u64> = sink.transcript().iter().map(|l| l.conn).collect();
    assert_eq!(connections.len(), 1, "one kept connection: {lines:?}");
    assert!(lines.iter().any(|l| l.eq_ignore_ascii_case("RSET")), "no RSET after the refused transaction: {lines:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_dropped_while_idle_costs_no_attempt() {
    let sink = SmtpSink::start().await;
    // The relay closes connections idle for a second, as NATs and relays' idle timeouts do.
    sink.control(json!({ "idle_timeout_s": 1.0 }));
    let app = TestApp::spawn(&sink, &[("SMTP_MAX_SENDERS", "1")]).await;
    assert_eq!(app.post("/post", batch("idle-a", 1, 1).to_string()).await.0, 202);
    sink.wait_for_count(1, LONG).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(app.post("/post", batch("idle-b", 1, 1).to_string()).await.0, 202);
    let letters = app.wait_all_final(2, LONG).await;
    for letter in &letters {
        assert_eq!(letter.status, Status::Sent);
        assert_eq!(letter.attempts, 1, "{}: {:?}", letter.subject, letter.last_reply);
    }
    let received = sink.wait_for_count(2, LONG).await;
    assert_eq!(received.len(), 2);
    assert_ne!(received[0].conn, received[1].conn, "the second letter went on a fresh connection");

    // Checked before use: a connection idle longer than SMTP_IDLE_CHECK_AFTER gets a NOOP first.
    let sink = SmtpSink::start().await;
    let app = TestApp::spawn(&sink, &[("SMTP_MAX_SENDERS", "1"), ("SMTP_IDLE_CHECK_AFTER", "300ms")]).await;
    assert_eq!(app.post("/post", batch("noop-a", 1, 1).to_string()).await.0, 202);
    sink.wait_for_count(1, LONG).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(app.post("/post", batch("noop-b", 1, 1).to_string()).await.0, 202);
    let received = sink.wait_for_count(2, LONG).await;
    assert_eq!(received[0].conn, received[1].conn, "a healthy idle connection is kept");
    assert!(sink.client_lines().iter().any(|l| l.eq_ignore_ascii_case("NOOP")), "{:?}", sink.client_lines());
}

/// Letters per second at the server within [from, to).
fn rate(times: &[f64], from: f64, to: f64) -> f64 {
    times.iter().filter(|t| **t >= from && **t < to).count() as f64 / (to - from)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_throttle_reply_slows_the_whole_instance_which_then_recovers() {
    let sink = SmtpSink::start().await;
    let app = TestApp::spawn(
        &sink,
        &[
            ("SMTP_RATE_LIMIT_PERIOD", "1s"),
            ("SMTP_RATE_LIMIT_MAX_LETTERS", "20"),
            ("SMTP_THROTTLE_RECOVERY_STEP", "1s"),
            ("SMTP_MAX_SENDERS", "4"),
        ],
    )
    .await;
    let total = 240;
    assert_eq!(app.post("/post", batch("throttle", total, 1).to_string()).await.0, 202);
    sink.wait_for_count(60, LONG).await;
    // Like SES: every MAIL FROM for half a second gets "454 Throttling failure".
    let throttle_start = unix_now();
    let throttle_end = throttle_start + 0.5;
    sink.control(json!({
        "throttle_reply": "454 4.7.0 Throttling failure: Maximum sending rate exceeded.",
        "throttle_until": throttle_end,
    }));
    let letters = app.wait_all_final(total, Duration::from_secs(90)).await;
    let received = sink.received();
    assert_eq!(received.len(), total, "each letter exactly once");
    assert!(letters.iter().all(|l| l.status == Status::Sent));
    assert!(
        letters.iter().all(|l| l.attempts == 1),
        "a throttled letter loses no attempt: {:?}",
        letters.iter().filter(|l| l.attempts != 1).map(|l| (&l.subject, l.attempts)).collect::<Vec<_>>()
    );
    let mut times: Vec<f64> = received.iter().map(|r| r.ts).collect();
    times.sort_by(f64::total_cmp);
    let before = rate(&times, throttle_start - 2.0, throttle_start);
    let slowed = rate(&times, throttle_end, throttle_end + 2.0);
    let last = *times.last().unwrap();
    let recovered = rate(&times, last - 3.0, last);
    println!("rate before {before:.1}/s, after the throttle {slowed:.1}/s, at the end {recovered:.1}/s");
    assert!(before >= 16.0, "before the throttle: {before:.1}/s");
    assert!(slowed <= 0.75 * before, "not slowed down: {slowed:.1}/s after, {before:.1}/s before");
    // Back to the rate it had before, measured on the same machine: on a loaded one the rate
    // before read 17.0/s and the end 15.0/s, where an absolute 16/s failed though it recovered;
    // not recovered, the end stays at the slowed rate, at most 75 % of the rate before.
    assert!(recovered >= 0.85 * before, "not recovered: {recovered:.1}/s at the end, {before:.1}/s before");
    let (_, metrics) = app.get("/metrics").await;
    let events = metrics
        .lines()
        .find_map(|l| l.strip_prefix("mailsender_smtp_throttle_events_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(events >= 1.0, "no throttle event counted:\n{metrics}");
}

#[tokio::test(flavor = "multi_thread")]
async fn credentials_never_cross_the_wire_in_clear_text() {
    let certs = test_certs();
    let ca = certs.join("ca.pem");
    // The server would take AUTH in clear text, as a careless relay or a man in the middle does.
    let sink = SmtpSink::start_options(SinkOptions {
        tls: SinkTls::StartTls,
        extra_args: vec!["--auth-plaintext".into()],
        ..Default::default()
    })
    .await;
    // A man in the middle strips STARTTLS from the EHLO reply.
    sink.control(json!({ "ehlo_drop": ["STARTTLS"] }));
    let app = TestApp::spawn(
        &sink,
        &[
            ("SMTP_TLS", "opportunistic"),
            ("SMTP_HOST", "localhost"),
            ("SMTP_TLS_CA_FILE", ca.to_str().unwrap()),
            ("SMTP_USER", "mailer@example.org"),
            ("SMTP_PASSWORD", "relay-password"),
            ("RETRY_BACKOFF_BASE", "3s"),
            ("RETRY_BACKOFF_MAX", "3s"),
        ],
    )
    .await;
    assert_eq!(app.post("/post", batch("auth", 1, 1).to_string()).await.0, 202);
    let letters =
        app.wait_for_letters("the refusal to authenticate in clear", LONG, |l| l.iter().any(|l| l.attempts >= 1)).await;
    let reason = letters[0].last_reply.clone().unwrap_or_default();
    assert!(reason.contains("clear text") && reason.contains("SMTP_TLS"), "{reason}");
    let lines = sink.client_lines();
    assert!(!lines.is_empty(), "the client never talked to the server");
    assert!(!lines.iter().any(|l| l.to_ascii_uppercase().starts_with("AUTH")), "AUTH in clear text: {lines:?}");
    assert!(!app.log().contains("relay-password"), "the password reached the log");
    assert!(sink.received().is_empty());

    // With STARTTLS offered again, the retry authenticates over TLS and the letter goes.
    sink.control(json!({}));
    let received = sink.wait_for_count(1, LONG).await;
    assert!(received[0].tls);
    let lines = sink.client_lines();
    let starttls = lines.iter().position(|l| l.eq_ignore_ascii_case("STARTTLS")).expect("STARTTLS sent");
    let auth = lines.iter().position(|l| l.to_ascii_uppercase().starts_with("AUTH")).expect("AUTH sent");
    assert!(starttls < auth, "AUTH before STARTTLS: {lines:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bodies_round_trip_and_every_line_fits_998_octets() {
    let sink = SmtpSink::start().await;
    let app = TestApp::spawn(&sink, &[]).await;
    let body = format!(
        "<p>{}</p>\n.a line that starts with a dot\n..and two\r\nbare CR\rnext\r\n.\nend",
        "Съешь же ещё этих мягких французских булок. ".repeat(500)
    );
    assert!(body.chars().count() > 20_000);
    let subject = format!("{}{}", "Очень длинная тема ".repeat(20), "x".repeat(400));
    let (status, response) =
        app.post("/post", json!([mailing(&subject, &body, &addresses("body", 1))]).to_string()).await;
    assert_eq!(status, 202, "{response}");
    let received = sink.wait_for_count(1, LONG).await;
    let message = &received[0];
    let bytes = message.bytes();
    let longest = bytes.split(|b| *b == b'\n').map(|l| l.strip_suffix(b"\r").unwrap_or(l).len()).max().unwrap();
    assert!(longest <= 998 && message.max_line <= 998, "a line of {longest} / {} octets", message.max_line);
    let parsed = mail_parser::MessageParser::default().parse(&bytes).expect("a MIME message");
    let html = parsed.body_html(0).expect("an HTML part");
    let expected = body.replace("\r\n", "\n").replace('\r', "\n").replace('\n', "\r\n");
    assert_eq!(html.replace("\r\n", "\n"), expected.replace("\r\n", "\n"), "the decoded body differs");
    assert_eq!(parsed.subject(), Some(subject.as_str()));
    let letters = app.wait_all_final(1, LONG).await;
    assert_eq!(letters[0].status, Status::Sent);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_overlong_subject_is_refused_at_the_door_and_fails_its_letter_at_ingest() {
    let sink = SmtpSink::start().await;
    let app = TestApp::spawn(&sink, &[]).await;
    let subject = "s".repeat(100_000);
    let batch = json!([mailing(&subject, "<p>x</p>", &addresses("subj", 1))]);
    let (status, response) = app.post("/post", batch.to_string()).await;
    assert_eq!(status, 400, "{response}");
    assert!(response["error"].as_str().unwrap().contains("at most 900"), "{response}");

    let good = json!([mailing("fine", "<p>y</p>", &addresses("fine", 1))]);
    let mut both = batch.as_array().unwrap().clone();
    both.extend(good.as_array().unwrap().iter().cloned());
    app.produce(Some("subject-key"), Value::Array(both).to_string().as_bytes()).await;
    let letters = app.wait_all_final(2, LONG).await;
    let failed = letters.iter().find(|l| l.subject.len() > 1000).unwrap();
    assert_eq!(failed.status, Status::Error);
    assert!(failed.error.as_deref().unwrap().contains("Subject has 100000 characters"), "{:?}", failed.error);
    assert_eq!(letters.iter().find(|l| l.subject == "fine").unwrap().status, Status::Sent);
    assert_eq!(sink.received().len(), 1);
}

async fn international_addresses(smtputf8: bool) {
    let sink = SmtpSink::start().await;
    if !smtputf8 {
        sink.control(json!({ "ehlo_drop": ["SMTPUTF8"] }));
    }
    let app = TestApp::spawn(&sink, &[]).await;
    let to = vec!["ivan@пример.рф".to_owned(), "иван@пример.рф".to_owned(), "plain@example.org".to_owned()];
    assert_eq!(app.post("/post", json!([mailing("idn", "<p>привет</p>", &to)]).to_string()).await.0, 202);
    let letters = app.wait_all_final(1, LONG).await;
    let letter = &letters[0];
    assert_eq!(letter.status, Status::Sent, "{letter:?}");
    let received = sink.wait_for_count(1, LONG).await;
    let rcpts: HashSet<&str> = received.iter().flat_map(|m| m.rcpt_tos.iter().map(String::as_str)).collect();
    assert!(rcpts.contains("ivan@xn--e1afmkfd.xn--p1ai"), "IDN domain not in punycode: {rcpts:?}");
    assert!(rcpts.contains("plain@example.org"));
    if smtputf8 {
        assert!(rcpts.contains("иван@пример.рф"), "{rcpts:?}");
        assert!(received.iter().any(|m| m.mail_options.iter().any(|o| o.eq_ignore_ascii_case("SMTPUTF8"))));
        assert_eq!(letter.delivered.len(), 3);
    } else {
        assert_eq!(rcpts.len(), 2, "{rcpts:?}");
        assert_eq!(letter.delivered.len(), 2);
        assert_eq!(letter.rejected.len(), 1);
        assert_eq!(letter.rejected[0].address, "иван@пример.рф");
        assert!(letter.rejected[0].reply.contains("SMTPUTF8"), "{:?}", letter.rejected);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn international_addresses_with_smtputf8() {
    international_addresses(true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn international_addresses_without_smtputf8() {
    international_addresses(false).await;
}
