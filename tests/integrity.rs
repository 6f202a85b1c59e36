//! Where the happy path ends: letters that must not be stranded, and status messages that must
//! tell the truth.

mod common;

use std::time::Duration;

use common::*;
use mailsender::model::{Letter, Mailing, Status};
use mongodb::bson::{Document, doc, oid::ObjectId};
use serde_json::json;

const LONG: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread")]
async fn a_letter_retried_then_sent_reports_no_error() {
    let sink = SmtpSink::start().await;
    sink.control(json!({ "data_reply": "451 4.3.0 Temporary local problem, try later" }));
    let app = TestApp::spawn(&sink, &[("RETRY_BACKOFF_BASE", "1s"), ("RETRY_BACKOFF_MAX", "1s")]).await;
    app.produce(Some("retried"), batch("retried", 1, 1).to_string().as_bytes()).await;
    app.wait_for_letters("a first, failed attempt", LONG, |l| l.iter().any(|l| l.attempts >= 1)).await;
    sink.control(json!({}));
    let letters = app.wait_all_final(1, LONG).await;
    assert_eq!(letters[0].status, Status::Sent);
    assert!(letters[0].attempts >= 2);
    let statuses = app.consume(&app.topic_out, 1, LONG).await;
    let message = statuses[0].json();
    assert_eq!(message["Status"], "sent", "{message}");
    assert!(message.get("Error").is_none(), "a sent letter reports an old error: {message}");
    assert!(letters[0].error.is_none(), "{:?}", letters[0].error);
}

#[tokio::test(flavor = "multi_thread")]
async fn recipients_never_reached_are_listed_when_attempts_run_out() {
    let sink = SmtpSink::start().await;
    sink.control(json!({ "rcpt_replies": { "busy@example.org": "450 4.2.0 Mailbox busy" } }));
    let app =
        TestApp::spawn(&sink, &[("SMTP_MAX_ATTEMPTS", "2"), ("RETRY_BACKOFF_BASE", "2s"), ("RETRY_BACKOFF_MAX", "2s")])
            .await;
    let batch = json!([{ "Subject": "partial", "Body": "<p>x</p>", "Addresses": ["fine@example.org", "busy@example.org"], "Token": "t" }]);
    app.produce(Some("partial"), batch.to_string().as_bytes()).await;
    // First attempt: one delivered, one deferred. The last attempt then fails as a whole.
    app.wait_for_letters("the first attempt", LONG, |l| l.iter().any(|l| l.attempts >= 1)).await;
    sink.control(json!({ "mail_reply": "451 4.3.0 Temporary local problem" }));
    let letters = app.wait_all_final(1, LONG).await;
    assert_eq!(letters[0].status, Status::Sent);
    let message = app.consume(&app.topic_out, 1, LONG).await[0].json();
    assert_eq!(message["Delivered"], json!(["fine@example.org"]), "{message}");
    let rejected = message["Rejected"].as_array().unwrap();
    assert_eq!(rejected.len(), 1, "the unreached recipient is accounted for: {message}");
    assert_eq!(rejected[0]["Address"], "busy@example.org");
    let reply = rejected[0]["Reply"].as_str().unwrap();
    assert!(reply.contains("gave up after 2 attempts") && reply.contains("451"), "{reply}");
}

fn stored(subject: &str, address: &str) -> Document {
    doc! {
        "_id": ObjectId::new(), "addresses": [address], "subject": subject, "body": "<p>stored</p>",
        "token": "t", "status": "awaiting", "kafkakey": "direct", "due_ms": 0_i64, "attempts": 0,
        "delivered": [], "rejected": [], "updated_ms": 0_i64,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_malformed_document_fails_alone_and_strands_none_of_its_neighbours() {
    let sink = SmtpSink::start().await;
    let app = TestApp::spawn(&sink, &[]).await;
    let mut malformed = stored("malformed", "m@example.org");
    // A field of the wrong type, as a hand edit or another writer might leave it.
    malformed.insert("subject", 42);
    let mut documents = vec![malformed];
    documents.extend((0..3).map(|i| stored(&format!("good {i}"), &format!("good{i}@example.org"))));
    // One insert, so one claim takes them together.
    app.insert_raw(documents).await;
    sink.wait_for_count(3, LONG).await;
    let raw = wait_for("the malformed letter to end", LONG, || async {
        let raw = app.raw_letters().await;
        raw.iter().all(|d| d.get_str("status").is_ok_and(|s| s == "sent" || s == "error")).then_some(raw)
    })
    .await;
    let bad = raw.iter().find(|d| d.get_i32("subject").is_ok()).unwrap();
    assert_eq!(bad.get_str("status").unwrap(), "error", "{bad}");
    assert!(bad.get_str("error").unwrap().contains("cannot be read"), "{bad}");
    assert_eq!(raw.iter().filter(|d| d.get_str("status").unwrap() == "sent").count(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn letters_the_go_service_writes_while_this_one_runs_are_sent() {
    let sink = SmtpSink::start().await;
    let app = TestApp::spawn(&sink, &[]).await;
    // The Go service's shape: no due time, no source, no attempts.
    app.insert_raw(vec![doc! {
        "_id": ObjectId::new(), "addresses": ["canary@example.org"], "subject": "from Go", "body": "<p>go</p>",
        "token": "t", "status": "awaiting", "kafkakey": "go-key",
    }])
    .await;
    let received = sink.wait_for_count(1, LONG).await;
    assert_eq!(received[0].rcpt_tos, vec!["canary@example.org"]);
    let letters = app.wait_all_final(1, LONG).await;
    assert_eq!(letters[0].status, Status::Sent);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stage_that_fails_ends_the_process_loudly_after_releasing_its_letters() {
    for stage in ["dispatcher", "SMTP worker", "report", "lease maintenance", "republisher"] {
        let sink = SmtpSink::start().await;
        let injection = format!("panic:{stage}");
        let mut app = TestApp::spawn(&sink, &[("MAILSENDER_FAULT_INJECTION", injection.as_str())]).await;
        let status = app.wait_exit(Duration::from_secs(30)).await;
        assert!(!status.success(), "{stage}: the process went on (or exited 0) after the stage failed");
        let log = app.log();
        assert!(log.contains(&format!("{stage} panicked")), "{stage}: no reason in the log:\n{log}");
        assert!(log.contains("mailsender stopped"), "{stage}: no orderly shutdown:\n{log}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn status_messages_carry_the_source_key_bytes_and_a_missing_key_stays_missing() {
    let sink = SmtpSink::start().await;
    let app = TestApp::spawn(&sink, &[]).await;
    let binary: &[u8] = &[0xff, 0x00, 0xfe, b'k', 0x80];
    produce_bytes(&app.topic_in, None, batch("nokey", 1, 1).to_string().as_bytes()).await;
    produce_bytes(&app.topic_in, Some(binary), batch("binkey", 1, 1).to_string().as_bytes()).await;
    let statuses = app.consume(&app.topic_out, 2, LONG).await;
    let by_subject =
        |tag: &str| statuses.iter().find(|s| s.json()["Subject"].as_str().unwrap().starts_with(tag)).unwrap();
    let none = by_subject("nokey");
    assert_eq!(none.key_bytes, None, "a message without a key gets a status message without a key");
    assert_eq!(none.json()["KafkaKey"], "");
    let bin = by_subject("binkey");
    assert_eq!(bin.key_bytes.as_deref(), Some(binary), "the key bytes come back unchanged");
    assert!(bin.json()["KafkaKey"].is_string());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_recreated_topic_does_not_drop_new_mail_as_duplicates() {
    let sink = SmtpSink::start().await;
    let app = TestApp::spawn(&sink, &[]).await;
    // Letters of the topic's previous incarnation (or another cluster), whose offsets start at 0
    // too: in this version's form and in the form of earlier versions.
    let mut old = Vec::new();
    for partition in 0..2 {
        for source in [format!("{}/{partition}/0/0", app.topic_in), format!("{}/{partition}/0/0@1000", app.topic_in)] {
            let mut document = stored("old incarnation", "old@example.org");
            document.insert("status", "sent");
            document.insert("source", source);
            // Finished recently: retention (whose first run may come after this insert) keeps them.
            let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
            document.insert("updated_ms", now_ms);
            old.push(document);
        }
    }
    app.insert_raw(old).await;
    app.produce(Some("fresh"), batch("fresh", 1, 1).to_string().as_bytes()).await;
    let received = sink.wait_for_count(1, LONG).await;
    assert_eq!(received[0].rcpt_tos, vec!["fresh-0-0@example.org"]);
    let letters =
        app.wait_for_letters("the new letter", LONG, |l| l.iter().any(|l| l.subject.starts_with("fresh"))).await;
    assert_eq!(letters.len(), 5);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_five_megabyte_message_is_processed_and_does_not_block_its_partition() {
    let sink = SmtpSink::start().await;
    let app = TestApp::spawn(&sink, &[]).await;
    // 4.9 MB: tansu 0.6.0 serves messages up to about 5.1 MB (not 5 MiB) to any client.
    let body = format!("<p>{}</p>", "newsletter with inline images ".repeat(4_900_000 / 30 + 1));
    assert!(body.len() >= 4_900_000);
    let big = json!([{ "Subject": "big", "Body": body, "Addresses": ["big@example.org"], "Token": "t" }]);
    // The same key, so the same partition: the small batch sits behind the big one.
    app.produce(Some("same-partition"), big.to_string().as_bytes()).await;
    app.produce(Some("same-partition"), batch("small", 1, 1).to_string().as_bytes()).await;
    // And a malformed one just as big: set aside, within the dead-letter limit.
    let junk = format!("{{not a batch {}", "x".repeat(4_900_000));
    app.produce(Some("same-partition"), junk.as_bytes()).await;
    app.produce(Some("same-partition"), batch("after-junk", 1, 1).to_string().as_bytes()).await;

    let letters = app.wait_all_final(3, Duration::from_secs(90)).await;
    assert!(
        letters.iter().all(|l| l.status == Status::Sent),
        "{:?}",
        letters.iter().map(|l| (&l.subject, l.status)).collect::<Vec<_>>()
    );
    let received = sink.wait_for_count(3, LONG).await;
    let big_message = received.iter().find(|m| m.rcpt_tos == ["big@example.org"]).expect("the big letter");
    assert!(big_message.raw.len() > 4_900_000);
    let statuses = app.consume(&app.topic_out, 3, LONG).await;
    let big_status = statuses.iter().map(|s| s.json()).find(|m| m["Subject"] == "big").unwrap();
    assert_eq!(big_status["BodyOmitted"], true, "a 5 MB body does not go into the status message");
    assert!(statuses.iter().all(|s| s.payload.len() < 64 * 1024));
    let dead = app.consume(&app.topic_dlq, 1, LONG).await;
    assert_eq!(dead[0].headers.get("x-truncated").map(String::as_str), Some("true"));
    assert_eq!(dead[0].headers["x-original-size"], junk.len().to_string());
    assert_eq!(dead[0].payload.len(), 1 << 20);
}

#[tokio::test(flavor = "multi_thread")]
async fn finished_letters_past_retention_are_deleted_and_nothing_else() {
    let sink = SmtpSink::start().await;
    // The republisher takes an unreported outcome once it is older than the producer's message
    // timeout (and 15 s); publishing it and then deleting it is right. Its first round runs at
    // start, and on a loaded machine came after the letters below were stored: it published the
    // unreported one, retention deleted it, and two letters of the three were left. With a
    // message timeout of 3 h, an outcome finished 2 h ago is past retention but not yet the
    // republisher's.
    let app = TestApp::spawn(
        &sink,
        &[
            ("LETTER_RETENTION", "1h"),
            ("LETTER_RETENTION_INTERVAL", "500ms"),
            ("REPUBLISH_INTERVAL", "10m"),
            ("KAFKA_MESSAGE_TIMEOUT", "3h"),
        ],
    )
    .await;
    let old = 1_000_i64; // 1970: long past any retention
    let two_hours_ago = mailsender::clock::host_ms() - 2 * 3_600_000;
    let mut documents = Vec::new();
    for (subject, status, unreported) in [
        ("old sent", "sent", false),
        ("old error", "error", false),
        ("old sent, status not published yet", "sent", true),
        ("old awaiting", "awaiting", false),
    ] {
        let mut document = stored(subject, "kept@example.org");
        document.insert("status", status);
        document.insert("updated_ms", if unreported { two_hours_ago } else { old });
        document.insert("due_ms", i64::MAX);
        if unreported {
            document.insert("unreported", 1);
        }
        documents.push(document);
    }
    let mut recent = stored("recent sent", "recent@example.org");
    recent.insert("status", "sent");
    recent.insert("updated_ms", mailsender::clock::host_ms());
    documents.push(recent);
    app.insert_raw(documents).await;
    let left = wait_for("retention to delete the old finished letters", LONG, || async {
        let raw = app.raw_letters().await;
        (raw.len() == 3).then_some(raw)
    })
    .await;
    let mut subjects: Vec<&str> = left.iter().map(|d| d.get_str("subject").unwrap()).collect();
    subjects.sort();
    assert_eq!(subjects, ["old awaiting", "old sent, status not published yet", "recent sent"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn letters_another_replica_took_over_are_not_sent_from_here() {
    let sink = SmtpSink::start().await;
    sink.control(json!({ "data_delay_s": 1.0 }));
    // One worker, one letter a second; leases renewed every 2 s (LEASE_DURATION 6 s).
    let app = TestApp::spawn(&sink, &[("SMTP_MAX_SENDERS", "1")]).await;
    assert_eq!(app.post("/post", batch("stolen", 12, 1).to_string()).await.0, 202);
    app.wait_for_letters("letters leased", LONG, |l| l.iter().filter(|l| l.status == Status::Processing).count() >= 6)
        .await;
    sink.wait_for_count(1, LONG).await;
    // Another replica reaped them while this one was cut off, and now holds them.
    let stolen = take_over_processing_letters(&app).await;
    assert!(stolen >= 5, "{stolen}");
    let at_steal = sink.received().len();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let after = sink.received().len() - at_steal;
    // The send in flight finishes, and at most what starts before the next renewal (2 s).
    assert!(after <= 3, "{after} of {stolen} letters taken over by another replica were still sent from here");
    let log = app.log();
    assert!(log.contains("taken over by another"), "no warning in the log");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_partition_that_cannot_move_shows_in_a_metric_and_a_warning() {
    let sink = SmtpSink::start().await;
    let app = TestApp::spawn(&sink, &[("KAFKA_STATISTICS_INTERVAL", "1s"), ("KAFKA_STALL_WARNING", "3s")]).await;
    app.produce(Some("stall"), batch("before", 1, 1).to_string().as_bytes()).await;
    sink.wait_for_count(1, LONG).await;
    // tansu 0.6.0 stores a message of 5.4 MB but never serves it to a consumer: the partition
    // cannot move past it, as it could not past any message larger than the consumer's limit.
    let stuck =
        json!([{ "Subject": "stuck", "Body": "x".repeat(5_400_000), "Addresses": ["s@example.org"], "Token": "t" }]);
    app.produce(Some("stall"), stuck.to_string().as_bytes()).await;
    app.produce(Some("stall"), batch("behind", 1, 1).to_string().as_bytes()).await;
    let metrics = wait_for("the stalled partition in /metrics", LONG, || async {
        let (_, text) = app.get("/metrics").await;
        text.lines().any(|l| l.starts_with("mailsender_partition_stalled{") && l.ends_with(" 1")).then_some(text)
    })
    .await;
    assert!(app.log().contains("input partition stalled"), "no warning in the log");
    assert!(metrics.contains("# TYPE mailsender_partition_stalled gauge"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_letter_too_large_for_mongodb_fails_alone_and_its_partition_moves_on() {
    let sink = SmtpSink::start().await;
    // Letters failed at ingest are reported by the republisher.
    let app = TestApp::spawn(&sink, &[("REPUBLISH_INTERVAL", "1s"), ("KAFKA_MESSAGE_TIMEOUT", "2s")]).await;
    // The broker here serves messages up to about 5 MB, but BSON spends 15 bytes on an array
    // element that JSON writes in 4: 1.2 million short addresses make a document over MongoDB's
    // 16 MiB limit, which no retry can change.
    let addresses = vec!["a"; 1_200_000];
    let huge = json!([
        { "Subject": "huge", "Body": "<p>hi</p>", "Addresses": addresses, "Token": "huge-token" },
        { "Subject": "beside", "Body": "<p>fits</p>", "Addresses": ["beside@example.org"], "Token": "t" },
    ]);
    app.produce(Some("same-partition"), huge.to_string().as_bytes()).await;
    app.produce(Some("same-partition"), batch("after", 1, 1).to_string().as_bytes()).await;

    let letters = app.wait_all_final(3, LONG).await;
    let huge = letters.iter().find(|l| l.subject == "huge").expect("the huge letter, failed");
    assert_eq!(huge.status, Status::Error);
    let reason = huge.error.clone().unwrap_or_default();
    assert!(reason.contains("over MongoDB's limit"), "{reason}");
    assert!(reason.contains("1200000 addresses were dropped"), "{reason}");
    for subject in ["beside", "after letter 0"] {
        let letter = letters.iter().find(|l| l.subject == subject).unwrap_or_else(|| panic!("{subject}: {letters:?}"));
        assert_eq!(letter.status, Status::Sent, "{subject}");
    }
    assert_eq!(sink.wait_for_count(2, LONG).await.len(), 2);
    let statuses = app.consume(&app.topic_out, 3, LONG).await;
    let status = statuses.iter().map(|s| s.json()).find(|m| m["Subject"] == "huge").expect("its status message");
    assert_eq!(status["Status"], "error");
    assert_eq!(status["Token"], "huge-token");
    assert!(status["Error"].as_str().unwrap_or_default().contains("over MongoDB's limit"), "{status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_letter_the_dead_letter_topic_refuses_is_kept_and_its_partition_moves_on() {
    let sink = SmtpSink::start().await;
    let name = unique("nodlq");
    let (topic_in, topic_out) = (format!("{name}-in"), format!("{name}-out"));
    create_topics(&[&topic_in, &topic_out], 2).await;
    // The dead-letter topic was never created and the broker does not create topics on demand.
    let app = TestApp::spawn(
        &sink,
        &[
            ("KAFKA_CREATE_TOPICS", "false"),
            ("KAFKA_TOPIC_MAILSENDER", &topic_in),
            ("KAFKA_TOPIC_PROFILE", &topic_out),
            ("KAFKA_TOPIC_DLQ", &format!("{name}-missing.dlq")),
            ("KAFKA_MESSAGE_TIMEOUT", "2s"),
        ],
    )
    .await;
    app.produce(Some("same-partition"), b"{not a batch").await;
    app.produce(Some("same-partition"), batch("after", 1, 1).to_string().as_bytes()).await;

    let letters = app.wait_all_final(1, LONG).await;
    assert_eq!(letters[0].status, Status::Sent);
    let kept = wait_for("the dead letter kept in MongoDB", LONG, || async {
        let kept = app.raw_documents("letters_dead_letters").await;
        (!kept.is_empty()).then_some(kept)
    })
    .await;
    // The partition moves on: a batch produced after the refusal is processed too.
    app.produce(Some("same-partition"), batch("later", 1, 1).to_string().as_bytes()).await;
    let letters = app.wait_all_final(2, LONG).await;
    assert!(letters.iter().all(|l| l.status == Status::Sent));
    assert_eq!(kept.len(), 1, "{kept:?}");
    let payload = kept[0].get_binary_generic("payload").unwrap();
    assert_eq!(payload.as_slice(), b"{not a batch");
    let reason = kept[0].get_str("reason").unwrap();
    assert!(reason.contains("JSON"), "{reason}");
    assert!(!kept[0].get_str("dlq_error").unwrap().is_empty());
    let metrics = app.get("/metrics").await.1;
    assert!(metrics.contains("mailsender_dead_letters_kept_in_mongodb_total 1"), "{metrics}");
}

/// Peak resident memory of a process, from the kernel's high-water mark.
fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib / 1024.0
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backlog_of_megabyte_letters_stays_under_the_memory_ceiling() {
    let sink = SmtpSink::start().await;
    // Sending slower than ingest, so the backlog waits in MongoDB and the dispatcher would
    // otherwise hold as many letters as it can send within half a lease (here 150, 90 MB).
    let app = TestApp::spawn(
        &sink,
        &[
            ("SMTP_RATE_LIMIT_MAX_LETTERS", "50"),
            ("LEASE_DURATION", "6s"),
            ("DISPATCH_MAX_BYTES", "8388608"),
            ("SMTP_MAX_SENDERS", "4"),
        ],
    )
    .await;
    let body = format!("<p>{}</p>", "a newsletter with inline images ".repeat(600_000 / 32));
    let count = 160;
    // A backlog already waiting in MongoDB (after an outage of the relay, say), as ingest
    // stores it.
    for chunk in 0..count / 10 {
        let letters: Vec<Letter> = (chunk * 10..chunk * 10 + 10)
            .map(|i| {
                let mailing = Mailing {
                    subject: format!("big {i}"),
                    body: body.clone(),
                    addresses: vec![format!("r{i}@example.org")],
                    token: "t".into(),
                    extra: Default::default(),
                };
                Letter::from_mailing(mailing, Some(b"k"), format!("backlog/0/{i}/0"), 0)
            })
            .collect();
        app.letters_collection().insert_many(letters).await.unwrap();
    }
    let letters = app.wait_all_final(count, Duration::from_secs(120)).await;
    assert!(letters.iter().all(|l| l.status == Status::Sent));
    assert_eq!(sink.wait_for_count(count, LONG).await.len(), count);
    let peak = peak_rss_mib(app.pid().unwrap());
    eprintln!("peak RSS {peak:.1} MiB for {count} letters of {} KB", body.len() / 1000);
    // Measured: 39 MiB; 98 MiB without the byte bound (the README gives the formula).
    assert!(peak < 64.0, "peak RSS {peak:.1} MiB");
}

#[tokio::test(flavor = "multi_thread")]
async fn outcomes_the_broker_refuses_do_not_starve_the_republisher() {
    let sink = SmtpSink::start().await;
    let app = TestApp::spawn(
        &sink,
        &[("REPUBLISH_INTERVAL", "500ms"), ("REPUBLISH_BATCH", "5"), ("KAFKA_MESSAGE_TIMEOUT", "2s")],
    )
    .await;
    // Ten unreported outcomes whose status messages the producer refuses (100,000 addresses make
    // one larger than its 2 MiB limit), older than three that publish fine: a round takes five.
    let addresses: Vec<String> = (0..100_000).map(|i| format!("member{i:06}@example.org")).collect();
    let letter = |subject: String, addresses: Vec<String>, updated_ms: i64| {
        doc! {
            "_id": ObjectId::new(), "addresses": addresses, "subject": subject, "body": "<p>x</p>", "token": "t",
            "status": "sent", "kafkakey": "k", "attempts": 1, "due_ms": 0_i64, "delivered": [], "rejected": [],
            "unreported": 1, "updated_ms": updated_ms,
        }
    };
    let refused: Vec<Document> =
        (0..10).map(|i| letter(format!("refused {i}"), addresses.clone(), 1_000 + i)).collect();
    app.insert_raw(refused).await;
    let fine: Vec<Document> =
        (0..3).map(|i| letter(format!("fine {i}"), vec![format!("fine{i}@example.org")], 2_000 + i)).collect();
    app.insert_raw(fine).await;

    let statuses = app.consume(&app.topic_out, 3, Duration::from_secs(30)).await;
    let mut subjects: Vec<String> =
        statuses.iter().map(|s| s.json()["Subject"].as_str().unwrap_or_default().to_owned()).collect();
    subjects.sort();
    assert_eq!(subjects, ["fine 0", "fine 1", "fine 2"]);
    let raw = app.raw_letters().await;
    let still: Vec<_> = raw.iter().filter(|d| d.get_i32("unreported").is_ok()).collect();
    assert_eq!(still.len(), 10, "the refused ones stay unreported, for a later round");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_letter_taken_over_mid_transaction_is_withdrawn_before_its_final_dot() {
    let sink = SmtpSink::start().await;
    // The relay is slow to open the data phase: the lease checked before MAIL FROM is stale by
    // the time the message could be handed over.
    sink.control(json!({ "data_start_delay_s": 4.0 }));
    let app = TestApp::spawn(&sink, &[("SMTP_MAX_SENDERS", "1"), ("LEASE_DURATION", "6s")]).await;
    assert_eq!(app.post("/post", batch("midway", 1, 1).to_string()).await.0, 202);
    wait_for("the worker in its transaction", LONG, || async {
        sink.client_lines().iter().any(|l| l.starts_with("DATA")).then_some(())
    })
    .await;
    // Another replica reaped the letter while this one was cut off, and now holds it; this
    // one's next renewal (every 2 s) shows it gone, before the 354 comes.
    let stolen = take_over_processing_letters(&app).await;
    assert_eq!(stolen, 1);
    // The dot is due once the 354 comes, 4 s after DATA: by then it is either withdrawn or sent.
    let withdrawn = wait_for("the transaction's end", Duration::from_secs(15), || async {
        let log = app.log();
        (log.contains("withdrawn before its final dot") || !sink.received().is_empty())
            .then(|| log.contains("withdrawn before its final dot"))
    })
    .await;
    assert!(sink.received().is_empty(), "the message was handed over although the letter was another replica's");
    assert!(withdrawn, "no trace of the withdrawal in the log");
}

/// Leases every `processing` letter to another replica, as one that reaped them while this app
/// was cut off from MongoDB would have; returns how many.
async fn take_over_processing_letters(app: &TestApp) -> u64 {
    let far = mailsender::clock::host_ms() + 600_000;
    app.update_raw(
        doc! { "status": "processing" },
        doc! { "$set": { "owner": "another-replica", "lease_ms": far, "claim": "theirs" } },
    )
    .await
}
