//! The edges of the letter store (issue 22): a lease left behind by a claim whose reply was lost
//! expires, a suppression lookup that cannot be done sends nothing, and a cancel stops the
//! letters replicas already claimed; an idle service's chores write nothing. Against the real
//! binary and the real servers.

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use common::*;
use mailsender::model::Status;
use mongodb::bson::{Document, doc, oid::ObjectId};
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

const LONG: Duration = Duration::from_secs(90);

fn unix_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

fn unix_s() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

fn raw_letter(addresses: &[String], subject: &str, key: &str) -> Document {
    doc! {
        "_id": ObjectId::new(), "addresses": addresses, "subject": subject, "body": "<p>edge</p>",
        "token": "t", "status": "awaiting", "kafkakey": key, "attempts": 0_i32, "due_ms": 0_i64,
        "updated_ms": unix_ms(),
    }
}

async fn insert_suppression(app: &TestApp, address: &str) {
    let client = mongodb::Client::with_uri_str(mongo_uri()).await.unwrap();
    client
        .database(&app.database)
        .collection::<Document>("letters_suppressions")
        .insert_one(doc! {
            "_id": address, "address": address, "reason": "unsubscribe", "source": "test", "time_ms": unix_ms(),
        })
        .await
        .unwrap();
}

/// Item: a claim whose `updateMany` reply was lost (applied by the server, an error here) leaves
/// letters `processing` under this process's owner that no worker holds. Maintenance must not
/// renew those, so the reaper frees them when their lease ends. Such letters are written here
/// directly, under the owner the running binary uses.
#[tokio::test(flavor = "multi_thread")]
async fn letters_leased_to_the_owner_but_not_held_are_not_renewed_and_get_reaped() {
    let sink = SmtpSink::start().await;
    // One letter an hour: the letters after the first stay claimed, which shows the owner.
    let app = TestApp::spawn(
        &sink,
        &[("SMTP_RATE_LIMIT_MAX_LETTERS", "1"), ("SMTP_RATE_LIMIT_PERIOD", "1h"), ("LEASE_DURATION", "6s")],
    )
    .await;
    app.produce(Some("slow"), batch("slow", 3, 1).to_string().as_bytes()).await;
    let owner = wait_for("a letter leased to the binary", LONG, || async {
        app.raw_letters().await.iter().find_map(|d| {
            (d.get_str("status") == Ok("processing")).then(|| d.get_str("owner").ok().map(str::to_owned)).flatten()
        })
    })
    .await;

    let orphans: Vec<Document> = (0..3)
        .map(|i| {
            let mut letter = raw_letter(&[format!("orphan-{i}@example.org")], &format!("orphan {i}"), "orphan");
            letter.extend(doc! {
                "status": "processing", "owner": &owner, "claim": "a-claim-whose-reply-was-lost",
                "lease_ms": unix_ms() + 2_000,
            });
            letter
        })
        .collect();
    app.insert_raw(orphans).await;

    // Maintenance runs every 2 s (a third of the lease): on the code before the fix every run
    // extended these leases, and they stayed `processing` under the lost claim forever.
    let freed = wait_for("the orphaned leases to be reaped", Duration::from_secs(30), || async {
        let orphans: Vec<Document> =
            app.raw_letters().await.into_iter().filter(|d| d.get_str("kafkakey") == Ok("orphan")).collect();
        let stuck = orphans.iter().any(|d| d.get_str("claim") == Ok("a-claim-whose-reply-was-lost"));
        (orphans.len() == 3 && !stuck).then_some(orphans)
    })
    .await;
    for orphan in &freed {
        assert_eq!(orphan.get_i32("attempts").unwrap_or(0), 0, "reaping counts no attempt: {orphan}");
    }
    assert!(app.log().contains("returned letters with expired leases to awaiting"), "{}", app.log());
    // The letters the binary does hold stay leased to it (renewed, not reaped).
    let held = app.raw_letters().await;
    let slow_processing = held
        .iter()
        .filter(|d| d.get_str("kafkakey") == Ok("slow") && d.get_str("status") == Ok("processing"))
        .filter(|d| d.get_str("owner") == Ok(owner.as_str()))
        .count();
    assert!(slow_processing >= 1, "the held letters were lost: {held:?}");
}

/// Item: a claim whose recipients make one `$in` larger than MongoDB's 16 MiB command limit
/// (72,000 addresses of 237 bytes here) is looked up in chunks, and the suppressed address, in
/// the last letter, is still found. Before, the lookup failed every time and the letters went
/// out unchecked.
#[tokio::test(flavor = "multi_thread")]
async fn a_claim_too_large_for_one_lookup_still_skips_the_suppressed_address() {
    let sink = SmtpSink::start().await;
    // Refuse every transaction, so 72,000 recipients cost no SMTP time: what matters is what
    // the dispatcher marked suppressed before the send. Nothing reaches the relay either way.
    sink.control(json!({ "mail_reply": "550 5.7.1 refused by the test" }));
    // 17 MiB of letters strain the Mongo-wire server (seconds per round trip): a long lease
    // keeps the claim from expiring meanwhile.
    let app = TestApp::spawn(&sink, &[("LEASE_DURATION", "120s")]).await;
    let domain = format!("{}.{}.{}.example.org", "a".repeat(55), "b".repeat(55), "c".repeat(55));
    let address = |i: usize| format!("u{i:06}{}@{domain}", "x".repeat(50));
    let suppressed = address(71_999);
    assert_eq!(suppressed.len(), 237);
    insert_suppression(&app, &suppressed).await;
    let letters: Vec<Document> = (0..3)
        .map(|l| {
            let addresses: Vec<String> = (l * 24_000..(l + 1) * 24_000).map(address).collect();
            raw_letter(&addresses, &format!("large {l}"), "large")
        })
        .collect();
    app.insert_raw(letters).await;

    // What the dispatcher decided for the claim, as it logs it: the letters' stored outcome
    // would also need 17 MiB of them sent, recorded and read back, which loads the shared
    // Mongo-wire server for minutes.
    let log = wait_for("the claim's suppression check", Duration::from_secs(180), || async {
        let log = app.log();
        (log.contains("suppressed recipient skipped") || log.contains("suppression lookup failed")).then_some(log)
    })
    .await;
    let found = log.lines().any(|l| l.contains("suppressed recipient skipped") && l.contains(&suppressed));
    assert!(found, "the suppressed address was not found in the claim:\n{log}");
    assert!(!app.log().contains("suppression lookup failed"), "{}", app.log());
}

/// What the proxy does with one wire message from the service to MongoDB.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fault {
    Forward,
    /// Cut the connection instead: the server never sees the command.
    Cut,
    /// Hand the command over, then cut the connection before the reply: the server applied it,
    /// the client sees a network error.
    CutAfter,
}

/// Decides the fate of each wire message.
type Decide = Arc<dyn Fn(&[u8]) -> Fault + Send + Sync>;

/// A TCP proxy in front of the real MongoDB server that injects network faults into the
/// service's connection, command by command, as `decide` says; everything else goes through.
async fn faulty_proxy(decide: Decide) -> u16 {
    let uri = mongo_uri();
    let target = mongodb_address(&uri);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else { return };
            let Ok(server) = TcpStream::connect(&target).await else { continue };
            let decide = decide.clone();
            tokio::spawn(async move {
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                let back = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
                });
                // Client to server, one wire message at a time (a little-endian length first).
                loop {
                    let mut length = [0u8; 4];
                    if client_read.read_exact(&mut length).await.is_err() {
                        break;
                    }
                    let total = i32::from_le_bytes(length) as usize;
                    let mut message = length.to_vec();
                    message.resize(total.max(4), 0);
                    if client_read.read_exact(&mut message[4..]).await.is_err() {
                        break;
                    }
                    let fault = decide(&message);
                    if fault == Fault::Cut {
                        break;
                    }
                    if server_write.write_all(&message).await.is_err() {
                        break;
                    }
                    if fault == Fault::CutAfter {
                        // Time for the server to apply it; its reply is never passed on.
                        back.abort();
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        break;
                    }
                }
                back.abort();
            });
        }
    });
    port
}

fn contains(message: &[u8], needle: &[u8]) -> bool {
    message.windows(needle.len()).any(|w| w == needle)
}

/// A BSON string element as it appears on the wire: type 2, name, length, value.
fn string_element(name: &str, value: &str) -> Vec<u8> {
    let mut element = vec![0x02];
    element.extend_from_slice(name.as_bytes());
    element.push(0);
    element.extend_from_slice(&(value.len() as i32 + 1).to_le_bytes());
    element.extend_from_slice(value.as_bytes());
    element.push(0);
    element
}

/// Item: a claim's `updateMany` applied by the server whose reply is lost (a network error
/// after the write; `updateMany` is not a retryable write). The claim releases its letters by
/// claim token at once, so they are sent long before their lease would end. Before, they stayed
/// `processing` under this process's owner, renewed for as long as it lived.
#[tokio::test(flavor = "multi_thread")]
async fn a_claim_whose_reply_is_lost_releases_its_letters() {
    let sink = SmtpSink::start().await;
    let tripped = Arc::new(AtomicBool::new(false));
    let trip = tripped.clone();
    // The claim's update sets `status: "processing"` and a claim token of 24 hex digits; cut
    // the first one after the server has it.
    let decide = Arc::new(move |message: &[u8]| {
        let claim = contains(message, b"\x02update\x00")
            && contains(message, &string_element("status", "processing"))
            && contains(message, b"\x02claim\x00\x19\x00\x00\x00");
        if claim && !trip.swap(true, Ordering::SeqCst) { Fault::CutAfter } else { Fault::Forward }
    });
    let port = faulty_proxy(decide).await;
    let via_proxy = format!("mongodb://127.0.0.1:{port}/?directConnection=true");
    // A lease far longer than the test waits: only a release can free the letters in time.
    let app = TestApp::spawn(&sink, &[("MONGO_LOCAL", via_proxy.as_str()), ("LEASE_DURATION", "120s")]).await;
    let letters: Vec<Document> =
        (0..3).map(|i| raw_letter(&[format!("lost-{i}@example.org")], &format!("lost {i}"), "lost")).collect();
    app.insert_raw(letters).await;

    sink.wait_for_count(3, Duration::from_secs(30)).await;
    assert!(tripped.load(Ordering::SeqCst), "the claim's reply was never cut");
    let letters = app.wait_all_final(3, LONG).await;
    assert!(letters.iter().all(|l| l.status == Status::Sent && l.attempts == 1), "{letters:?}");
    assert!(app.log().contains("claiming letters failed"), "{}", app.log());
}

/// Item: while the suppression lookup fails, nothing is sent (before, the claimed letters went
/// out unchecked, to the address that unsubscribed); the letters go back to `awaiting` with no
/// attempt counted, and once the lookup works they are sent without the suppressed address.
#[tokio::test(flavor = "multi_thread")]
async fn a_failing_suppression_lookup_sends_nothing_and_returns_the_letters() {
    let sink = SmtpSink::start().await;
    let fail = Arc::new(AtomicBool::new(true));
    let cut = Arc::new(AtomicUsize::new(0));
    // Any `find` on the suppression collection, while `fail` is set.
    let lookup = string_element("find", "letters_suppressions");
    let (failing, cuts) = (fail.clone(), cut.clone());
    let decide = Arc::new(move |message: &[u8]| {
        if failing.load(Ordering::SeqCst) && contains(message, &lookup) {
            cuts.fetch_add(1, Ordering::SeqCst);
            Fault::Cut
        } else {
            Fault::Forward
        }
    });
    let port = faulty_proxy(decide).await;
    let via_proxy = format!("mongodb://127.0.0.1:{port}/?directConnection=true");
    let app = TestApp::spawn(&sink, &[("MONGO_LOCAL", via_proxy.as_str())]).await;
    insert_suppression(&app, "gone@example.org").await;
    let letters: Vec<Document> = (0..3)
        .map(|i| raw_letter(&[format!("kept-{i}@example.org"), "gone@example.org".into()], &format!("l{i}"), "k"))
        .collect();
    app.insert_raw(letters).await;

    wait_for("a failed lookup", LONG, || async { (cut.load(Ordering::SeqCst) >= 1).then_some(()) }).await;
    // Give any letter that went out unchecked time to arrive.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(sink.received().is_empty(), "sent without the suppression check: {:?}", sink.received());
    // The claimer tries again (backing off), and fails again while the lookup fails.
    wait_for("more failed lookups", LONG, || async { (cut.load(Ordering::SeqCst) >= 3).then_some(()) }).await;
    assert!(sink.received().is_empty(), "sent without the suppression check: {:?}", sink.received());
    let letters = app.letters().await;
    assert_eq!(letters.len(), 3);
    for letter in &letters {
        assert!(matches!(letter.status, Status::Awaiting | Status::Processing), "{letter:?}");
        assert_eq!(letter.attempts, 0, "an unchecked claim counts no attempt: {letter:?}");
    }
    assert!(app.log().contains("suppression lookup failed; the claimed letters go back unsent"));

    fail.store(false, Ordering::SeqCst);
    let letters = app.wait_all_final(3, LONG).await;
    for letter in &letters {
        assert_eq!(letter.status, Status::Sent, "{letter:?}");
        assert_eq!(letter.rejected.len(), 1, "{letter:?}");
        assert_eq!(letter.rejected[0].reply, "suppressed: unsubscribe");
    }
    let received = sink.received();
    assert_eq!(received.len(), 3);
    assert!(received.iter().all(|m| m.rcpt_tos.len() == 1 && m.rcpt_tos[0].starts_with("kept-")), "{received:?}");
}

/// Item: a cancel without a pause stops the letters replicas already claimed, not only the
/// waiting ones. 40 letters at 4 a second, cancelled after a few: once the cancel has answered
/// (plus the control watch's interval), no letter of the batch reaches the relay, and every
/// letter ends sent or cancelled. Before, each claimed letter (12 here) was still sent.
#[tokio::test(flavor = "multi_thread")]
async fn a_cancel_stops_the_letters_already_claimed() {
    let sink = SmtpSink::start().await;
    let app = TestApp::spawn(
        &sink,
        &[("SMTP_RATE_LIMIT_MAX_LETTERS", "4"), ("SMTP_RATE_LIMIT_PERIOD", "1s"), ("SMTP_MAX_SENDERS", "4")],
    )
    .await;
    app.produce(Some("cancel-claimed"), batch("cc", 40, 1).to_string().as_bytes()).await;
    sink.wait_for_count(4, LONG).await;

    let response = reqwest::Client::new().post(format!("{}/batches/cancel-claimed/cancel", app.http)).send().await;
    let answered = unix_s();
    let response = response.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let body: serde_json::Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
    assert!(body["cancelled"].as_u64().unwrap() > 0, "{body}");

    let letters = app.wait_all_final(40, LONG).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let received = sink.received();
    let late: Vec<_> = received.iter().filter(|m| m.ts > answered + 0.5).map(|m| (&m.rcpt_tos, m.ts)).collect();
    assert!(late.is_empty(), "sent after the cancel answered at {answered}: {late:?}");

    let sent: Vec<_> = letters.iter().filter(|l| l.status == Status::Sent).collect();
    let cancelled: Vec<_> =
        letters.iter().filter(|l| l.status == Status::Error && l.error.as_deref() == Some("cancelled")).collect();
    assert_eq!(sent.len() + cancelled.len(), 40, "every letter ends sent or cancelled: {letters:?}");
    assert!(!cancelled.is_empty() && sent.len() >= 4);
    assert_eq!(received.len(), sent.len(), "one message per sent letter");
    for letter in &cancelled {
        let address = letter.addresses[0].to_lowercase();
        assert!(!received.iter().any(|m| m.rcpt_tos.contains(&address)), "cancelled {address} was sent");
    }
    // Every cancelled letter's status message says so, those the workers ended included.
    let messages = app.consume(&app.topic_out, 40, LONG).await;
    let reported = messages
        .iter()
        .map(Consumed::json)
        .filter(|m| m["KafkaKey"] == "cancel-claimed" && m["Status"] == "error" && m["Error"] == "cancelled")
        .count();
    assert_eq!(reported, cancelled.len());
}

/// The commands of `command` the service has sent to MongoDB so far.
async fn mongo_commands(app: &TestApp, command: &str) -> f64 {
    let (_, text) = app.get("/metrics").await;
    metric_value(&text, &format!("mailsender_mongo_commands_total{{command=\"{command}\"}}")).unwrap_or(0.0)
}

/// The adoption of Go-era letters (every 2 s with the tests' 6 s lease) and the reaper of
/// expired leases (as often) look before they write: with nothing to adopt or reap they are
/// one indexed `find` each. They were `update_many`s on `$exists: false` and on the lease,
/// which the local stack's server answered by reading every awaiting letter: 60-90 ms each at
/// 20,000 waiting, every few seconds, and claims and outcomes waited behind them.
#[tokio::test(flavor = "multi_thread")]
async fn an_idle_service_s_chores_write_nothing() {
    let sink = SmtpSink::start().await;
    let app = TestApp::spawn(&sink, &[]).await;
    // Past the start's own writes (indexes, migrations).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (updates, finds) = (mongo_commands(&app, "update").await, mongo_commands(&app, "find").await);
    tokio::time::sleep(Duration::from_secs(7)).await;
    let finds_after = mongo_commands(&app, "find").await;
    assert!(finds_after >= finds + 6.0, "the chores did not run: {finds} finds, then {finds_after}");
    assert_eq!(mongo_commands(&app, "update").await, updates, "an idle service wrote to MongoDB");
}
