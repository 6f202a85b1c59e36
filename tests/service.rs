//! End-to-end tests of the core service against the real local stack.

mod common;

use std::{collections::HashSet, time::Duration};

use common::*;
use mailsender::model::Status;
use serde_json::json;

const LONG: Duration = Duration::from_secs(60);

fn assert_bcc_only(received: &[Received], addresses: &[String]) {
    for message in received {
        for (name, value) in &message.headers {
            for address in addresses {
                assert!(
                    !value.to_lowercase().contains(address),
                    "address {address} leaked into header {name}: {value}"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn posted_batch_is_stored_sent_bcc_only_and_reported() {
    let sink = SmtpSink::start().await;
    let app = TestApp::spawn(&sink, &[]).await;
    let batch = batch("post", 6, 2);

    let (status, body) = app.post("/post", batch.to_string()).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["mailings"], 6);
    let key = body["key"].as_str().expect("a key").to_owned();

    let received = sink.wait_for_count(6, LONG).await;
    assert_eq!(received.len(), 6);
    let mut expected: HashSet<Vec<String>> = batch
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let mut a: Vec<String> =
                m["Addresses"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_owned()).collect();
            a.sort();
            a
        })
        .collect();
    for message in &received {
        let mut rcpts = message.rcpt_tos.clone();
        rcpts.sort();
        assert_eq!(rcpts.len(), 2, "each letter has exactly its two recipients: {rcpts:?}");
        assert!(expected.remove(&rcpts), "unexpected or repeated envelope {rcpts:?}");
        assert_eq!(message.mail_from, "noreply@mailsender.test");
        for header in ["From", "Date", "Message-ID", "MIME-Version", "Subject", "Content-Type"] {
            assert!(message.header(header).is_some(), "{header} missing: {:?}", message.headers);
        }
        assert!(message.header("Content-Type").unwrap().contains("multipart/alternative"));
    }
    assert_bcc_only(&received, &addresses_of(&batch));

    let statuses = app.consume(&app.topic_out, 6, LONG).await;
    let mut ids = HashSet::new();
    for status in &statuses {
        assert_eq!(status.key.as_deref(), Some(key.as_str()), "status keyed by the source key");
        let message = status.json();
        for field in ["ID", "Addresses", "Subject", "Body", "Token", "Status", "KafkaKey"] {
            assert!(message.get(field).is_some(), "{field} missing from {message}");
        }
        assert_eq!(message["Status"], "sent");
        assert_eq!(message["KafkaKey"], key.as_str());
        assert_eq!(message["ID"].as_str().unwrap().len(), 24, "hex ObjectId");
        ids.insert(message["ID"].as_str().unwrap().to_owned());
    }
    assert_eq!(ids.len(), 6);

    let letters = app.wait_all_final(6, LONG).await;
    for letter in &letters {
        assert_eq!(letter.status, Status::Sent);
        assert_eq!(letter.kafkakey, key);
        assert!(ids.contains(&letter.id.to_hex()));
        assert_eq!(letter.attempts, 1);
        assert!(letter.last_reply.as_deref().unwrap_or_default().starts_with("250"), "{:?}", letter.last_reply);
    }
    // The Go service's field names are all present in the stored documents.
    for doc in app.raw_letters().await {
        for field in ["_id", "addresses", "subject", "body", "token", "status", "kafkakey"] {
            assert!(doc.contains_key(field), "{field} missing from {doc}");
        }
        // Published before it was stored: no republishing is pending.
        assert!(!doc.contains_key("unreported"), "{doc}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn batch_produced_to_kafka_keeps_its_own_key() {
    let sink = SmtpSink::start().await;
    let app = TestApp::spawn(&sink, &[]).await;
    let batch = batch("kafka", 3, 2);
    app.produce(Some("profile-key-42"), batch.to_string().as_bytes()).await;

    let statuses = app.consume(&app.topic_out, 3, LONG).await;
    for status in &statuses {
        assert_eq!(status.key.as_deref(), Some("profile-key-42"));
        assert_eq!(status.json()["KafkaKey"], "profile-key-42");
        assert_eq!(status.json()["Status"], "sent");
    }
    let received = sink.wait_for_count(3, LONG).await;
    assert_bcc_only(&received, &addresses_of(&batch));
    let letters = app.wait_all_final(3, LONG).await;
    assert!(letters.iter().all(|l| l.kafkakey == "profile-key-42" && l.status == Status::Sent));
}

#[tokio::test(flavor = "multi_thread")]
async fn rate_limit_holds_across_workers() {
    let sink = SmtpSink::start().await;
    // 5 letters per second shared by 4 workers.
    let app = TestApp::spawn(&sink, &[("SMTP_RATE_LIMIT_PERIOD", "1s"), ("SMTP_RATE_LIMIT_MAX_LETTERS", "5")]).await;
    let (status, _) = app.post("/post", batch("rate", 16, 1).to_string()).await;
    assert_eq!(status, 202);
    let received = sink.wait_for_count(16, LONG).await;
    let mut times: Vec<f64> = received.iter().map(|r| r.ts).collect();
    times.sort_by(f64::total_cmp);

    // No window of one period holds more than the budget. The window is shortened by 50 ms for
    // jitter between the limiter and the sink's clock; without the limiter all 16 would arrive
    // within a few hundred milliseconds.
    let window = 1.0 - 0.05;
    for (i, start) in times.iter().enumerate() {
        let in_window = times[i..].iter().take_while(|t| **t < start + window).count();
        assert!(in_window <= 5, "{in_window} letters within {window}s starting at #{i}: {times:?}");
    }
    let span = times.last().unwrap() - times.first().unwrap();
    let rate = (times.len() - 1) as f64 / span;
    assert!(rate <= 5.0 * 1.05, "sustained rate {rate:.2}/s exceeds 5/s");
    assert!(rate >= 5.0 * 0.7, "sustained rate {rate:.2}/s is far below the budget: the limiter starves workers");
}

#[tokio::test(flavor = "multi_thread")]
async fn halt_during_slow_sends_reverts_letters_which_are_sent_after_restart() {
    let sink = SmtpSink::start().await;
    sink.control(json!({ "data_delay_s": 3.0 }));
    let mut app = TestApp::spawn(&sink, &[("SMTP_MAX_SENDERS", "2")]).await;
    let (status, _) = app.post("/post", batch("halt", 8, 1).to_string()).await;
    assert_eq!(status, 202);

    // Wait until two sends are in progress, then halt. (Leased letters are not enough: a claim
    // leases all eight at once, before any worker has started a transaction.)
    app.wait_for_letters("letters being sent", LONG, |letters| {
        letters.len() == 8 && letters.iter().filter(|l| l.status == Status::Processing).count() >= 2
    })
    .await;
    wait_for("two sends in flight", LONG, || async {
        let (_, text) = app.get("/metrics").await;
        metric_value(&text, "mailsender_sends_in_flight").filter(|n| *n >= 2.0)
    })
    .await;
    let (status, body) = app.post("/halt", "").await;
    assert_eq!(status, 202, "{body}");
    let exit = app.wait_exit(Duration::from_secs(30)).await;
    assert!(exit.success(), "exit status {exit}; log:\n{}", app.log());

    let letters = app.letters().await;
    assert_eq!(letters.len(), 8);
    assert!(letters.iter().all(|l| l.status != Status::Processing), "processing letters left after halt: {letters:#?}");
    let sent = letters.iter().filter(|l| l.status == Status::Sent).count();
    let awaiting = letters.iter().filter(|l| l.status == Status::Awaiting).count();
    assert_eq!(sent + awaiting, 8);
    assert!(sent >= 2, "the two in-flight sends finish before exit (sent {sent})");
    assert!(awaiting >= 1, "unsent letters are reverted, not sent during halt");
    assert_eq!(sink.received().len(), sent, "every letter marked sent reached the server, and only those");

    sink.control(json!({}));
    app.start().await;
    let letters = app.wait_all_final(8, LONG).await;
    assert!(letters.iter().all(|l| l.status == Status::Sent));
    sink.wait_for_count(8, LONG).await;
    // A quiet period, so a late duplicate would be counted.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let received = sink.received();
    assert_eq!(received.len(), 8, "each letter delivered exactly once");
    let envelopes: HashSet<&String> = received.iter().map(|r| &r.rcpt_tos[0]).collect();
    assert_eq!(envelopes.len(), 8, "each letter to its own recipient");
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_http_bodies_get_a_clear_400_or_413() {
    let sink = SmtpSink::start().await;
    let app = TestApp::spawn(&sink, &[("HTTP_MAX_BODY_BYTES", "4096")]).await;
    let good = json!([{ "Subject": "s", "Body": "b", "Addresses": ["a@example.org"], "Token": "t" }]);
    for (body, fragment) in [
        ("not json".to_owned(), "JSON"),
        ("{}".to_owned(), "JSON"),
        ("[]".to_owned(), "empty"),
        (r#"[{"Subject":"s","Body":"b","Addresses":["a@example.org"]}]"#.to_owned(), "Token"),
        (r#"[{"Subject":5,"Body":"b","Addresses":["a@example.org"],"Token":"t"}]"#.to_owned(), "JSON"),
        (r#"[{"Subject":"s","Body":"b","Addresses":["not-an-address"],"Token":"t"}]"#.to_owned(), "not-an-address"),
        (r#"[{"Subject":"s","Body":"b","Addresses":[],"Token":"t"}]"#.to_owned(), "Addresses"),
        ("[{\"Subject\":\"a\\r\\nBcc: x@evil.org\",\"Body\":\"b\",\"Addresses\":[\"a@example.org\"],\"Token\":\"t\"}]".to_owned(), "line break"),
    ] {
        let (status, response) = app.post("/post", body.clone()).await;
        assert_eq!(status, 400, "{body} -> {response}");
        let error = response["error"].as_str().unwrap_or_default();
        assert!(error.contains(fragment), "{body}: error {error:?} should mention {fragment}");
        assert!(response["expected"].as_str().unwrap_or_default().contains("Addresses"), "{response}");
    }
    let huge =
        format!(r#"[{{"Subject":"s","Body":"{}","Addresses":["a@example.org"],"Token":"t"}}]"#, "x".repeat(10_000));
    let (status, _) = app.post("/post", huge).await;
    assert_eq!(status, 413);
    // Far over the limit, the client is still writing when the answer is ready: it must read
    // the 413, not find the connection reset under it.
    let far_over = vec![b'x'; 8 << 20];
    for attempt in 0..10 {
        let response = reqwest::Client::new()
            .post(format!("{}/post", app.http))
            .header("content-type", "application/json")
            .body(far_over.clone())
            .send()
            .await;
        let response = response.unwrap_or_else(|e| panic!("8 MiB post {attempt}: no answer, {e}"));
        assert_eq!(response.status().as_u16(), 413, "8 MiB post {attempt}");
        let text = response.text().await.unwrap_or_else(|e| panic!("8 MiB post {attempt}: {e}"));
        let answer: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        assert!(answer["error"].as_str().is_some_and(|e| !e.is_empty()), "8 MiB post {attempt}: {answer}");
    }

    // Nothing above reached the topic; the service still works.
    let (status, _) = app.post("/post", good.to_string()).await;
    assert_eq!(status, 202);
    sink.wait_for_count(1, LONG).await;
    assert_eq!(app.wait_all_final(1, LONG).await.len(), 1);
    let (status, body) = app.get("/health").await;
    assert_eq!((status, body.contains("ok")), (200, true));
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_kafka_message_is_dead_lettered_and_does_not_block_its_partition() {
    let sink = SmtpSink::start().await;
    let app = TestApp::spawn(&sink, &[]).await;
    // Same key, so the same partition: the good batch sits behind the bad message.
    app.produce(Some("same-key"), b"{definitely not a batch").await;
    app.produce(Some("same-key"), batch("after-bad", 2, 1).to_string().as_bytes()).await;

    let statuses = app.consume(&app.topic_out, 2, LONG).await;
    assert!(statuses.iter().all(|s| s.json()["Status"] == "sent"));
    let dead = app.consume(&app.topic_dlq, 1, LONG).await;
    assert_eq!(dead[0].payload, b"{definitely not a batch");
    assert_eq!(dead[0].key.as_deref(), Some("same-key"));
    assert!(dead[0].headers["x-error"].contains("JSON"), "{:?}", dead[0].headers);
    assert_eq!(dead[0].headers["x-source-topic"], app.topic_in);
    assert!(dead[0].headers.contains_key("x-source-partition") && dead[0].headers.contains_key("x-source-offset"));
    let (status, _) = app.get("/health").await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn permanent_smtp_failures_are_reported_with_the_reason() {
    permanent_failures(SmtpSink::start().await).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn permanent_smtp_failures_without_pipelining() {
    permanent_failures(SmtpSink::start_lockstep().await).await;
}

async fn permanent_failures(sink: SmtpSink) {
    sink.control(json!({ "rcpt_replies": {
        "bounce@example.org": "550 5.1.1 No such user here",
        "gone@example.org": "550 5.1.1 Mailbox gone",
    } }));
    let app = TestApp::spawn(&sink, &[]).await;
    let batch = json!([
        { "Subject": "all bad", "Body": "<p>x</p>", "Addresses": ["bounce@example.org"], "Token": "t1" },
        { "Subject": "partly bad", "Body": "<p>y</p>", "Addresses": ["gone@example.org", "fine@example.org"], "Token": "t2" },
    ]);
    app.produce(Some("perm"), batch.to_string().as_bytes()).await;

    let statuses = app.consume(&app.topic_out, 2, LONG).await;
    let by_token = |token: &str| statuses.iter().map(|s| s.json()).find(|m| m["Token"] == token).unwrap();
    let failed = by_token("t1");
    assert_eq!(failed["Status"], "error");
    assert!(failed["Error"].as_str().unwrap().contains("550"), "{failed}");
    assert!(failed["Error"].as_str().unwrap().contains("bounce@example.org"), "{failed}");
    let partial = by_token("t2");
    assert_eq!(partial["Status"], "sent", "{partial}");
    assert_eq!(partial["Rejected"][0]["Address"], "gone@example.org");
    assert!(partial["Rejected"][0]["Reply"].as_str().unwrap().contains("550"));

    let received = sink.wait_for_count(1, LONG).await;
    assert_eq!(received[0].rcpt_tos, vec!["fine@example.org"]);
    let letters = app.wait_all_final(2, LONG).await;
    let stored = letters.iter().find(|l| l.token == "t1").unwrap();
    assert_eq!(stored.status, Status::Error);
    assert!(stored.error.as_deref().unwrap().contains("550"));
    assert_eq!(stored.attempts, 1, "a permanent failure is not retried");
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_is_used_and_certificates_are_verified() {
    let certs = test_certs();
    let ca = certs.join("ca.pem");
    let ca = ca.to_str().unwrap();

    let starttls = SmtpSink::start_with(SinkTls::StartTls).await;
    let app =
        TestApp::spawn(&starttls, &[("SMTP_TLS", "starttls"), ("SMTP_HOST", "localhost"), ("SMTP_TLS_CA_FILE", ca)])
            .await;
    app.post("/post", batch("starttls", 1, 1).to_string()).await;
    let received = starttls.wait_for_count(1, LONG).await;
    assert!(received[0].tls, "STARTTLS was not used");
    drop(app);

    let implicit = SmtpSink::start_with(SinkTls::Implicit).await;
    let app =
        TestApp::spawn(&implicit, &[("SMTP_TLS", "implicit"), ("SMTP_HOST", "localhost"), ("SMTP_TLS_CA_FILE", ca)])
            .await;
    app.post("/post", batch("implicit", 1, 1).to_string()).await;
    let received = implicit.wait_for_count(1, LONG).await;
    assert!(received[0].tls, "implicit TLS was not used");
    drop(app);

    // Without the test CA the certificate is unknown: nothing is sent, the letter waits for a retry.
    let untrusted = SmtpSink::start_with(SinkTls::StartTls).await;
    let app = TestApp::spawn(&untrusted, &[("SMTP_TLS", "starttls"), ("SMTP_HOST", "localhost")]).await;
    app.post("/post", batch("untrusted", 1, 1).to_string()).await;
    let letters = app
        .wait_for_letters("a TLS failure to be recorded", LONG, |letters| {
            letters.iter().any(|l| l.attempts >= 1 && l.error.is_some())
        })
        .await;
    let error = letters[0].error.clone().unwrap();
    assert!(
        error.to_lowercase().contains("certificate") || error.contains("TLS") || error.contains("STARTTLS"),
        "{error}"
    );
    assert!(untrusted.received().is_empty(), "a letter went out over an unverified connection");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_and_sigint_shut_down_gracefully() {
    let sink = SmtpSink::start().await;
    let mut app = TestApp::spawn(&sink, &[]).await;
    for (round, signal) in ["-TERM", "-INT"].into_iter().enumerate() {
        assert_eq!(app.post("/post", batch(&format!("signal{signal}"), 2, 1).to_string()).await.0, 202);
        let pid = app.pid().unwrap().to_string();
        let stored = 2 * (round + 1);
        app.wait_for_letters("the batch to be stored", LONG, |letters| letters.len() == stored).await;
        assert!(std::process::Command::new("kill").args([signal, &pid]).status().unwrap().success());
        let status = app.wait_exit(Duration::from_secs(30)).await;
        assert!(status.success(), "{signal}: exit status {status}; log:\n{}", app.log());
        assert!(app.log().contains("mailsender stopped"), "{signal}: no orderly stop in the log");
        assert!(
            app.letters().await.iter().all(|l| l.status != Status::Processing),
            "{signal}: letters left processing"
        );
        app.start().await;
    }
    let letters = app.wait_all_final(4, LONG).await;
    assert!(letters.iter().all(|l| l.status == Status::Sent));
}
