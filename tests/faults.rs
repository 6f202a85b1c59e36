//! Fault injection against the real binary and the real local stack: kill -9 at random moments,
//! several replicas and one of them killed, the broker, the MongoDB-wire server and the SMTP
//! server going away mid-run, and a corpus of bad input over HTTP and Kafka.
//!
//! Every test here holds one global lock ([`chaos::serial`]): some of them stop servers that
//! all of them use. The broker and MongoDB restarts go through `scripts/stack.sh`, found via
//! `MAILSENDER_RUN`, `KAFKA_PORT` and `MONGO_PORT` (scripts/test.sh exports them). Figures are
//! printed (`--nocapture`) and kept in target/faults-report.txt.

#[path = "common/chaos.rs"]
mod chaos;
mod common;

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use chaos::{ChaosSink, EagerSink, Feeder, Replica, Server, Stack, rcpt_counts, read_topic, report, tally};
use common::*;
use mailsender::{
    clock::host_ms,
    model::{Letter, Status},
};
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde_json::{Value, json};

const LONG: Duration = Duration::from_secs(60);

/// Status-message IDs seen on a topic, read until `ids` are all there or `timeout` passes; and
/// how many messages were read.
async fn status_ids(topic: &str, ids: &HashSet<String>, timeout: Duration) -> (HashSet<String>, usize) {
    let mut seen = HashSet::new();
    let mut parsed = 0;
    let messages = read_topic(topic, timeout, |messages| {
        for message in &messages[parsed..] {
            if let Ok(value) = serde_json::from_slice::<Value>(&message.payload)
                && let Some(id) = value["ID"].as_str()
            {
                seen.insert(id.to_owned());
            }
        }
        parsed = messages.len();
        ids.is_subset(&seen)
    })
    .await;
    (seen, messages.len())
}

async fn wait_letter_count(app: &TestApp, count: usize, timeout: Duration) {
    wait_for(&format!("{count} letters stored"), timeout, || async {
        let letters = app.letters().await;
        (letters.len() >= count).then_some(())
    })
    .await;
}

/// Whether a letter's `owner` is the process with this INSTANCE_ID (the owner is the instance id,
/// possibly with a per-process suffix).
fn owned_by(owner: &str, instance: &str) -> bool {
    owner == instance || owner.strip_prefix(instance).is_some_and(|rest| rest.starts_with(['-', '/', ':']))
}

/// A TestApp whose SMTP server is `port` (the harness wants an `SmtpSink`; a throwaway one
/// satisfies it and is dropped once the app runs).
async fn spawn_on_port(port: u16, overrides: &[(&str, &str)]) -> TestApp {
    let placeholder = SmtpSink::start().await;
    let port = port.to_string();
    let mut all: Vec<(&str, &str)> = overrides.to_vec();
    all.push(("SMTP_PORT", &port));
    TestApp::spawn(&placeholder, &all).await
}

// ------------------------------------------------------------------------------------------------
// 1. kill -9 at random moments
// ------------------------------------------------------------------------------------------------

const KILL_BATCHES: usize = 40;
const KILL_PER_BATCH: usize = 50;
const KILLS: usize = 5;
const KILL_SENDERS: usize = 4;

/// One instance, 2,000 letters, SIGKILL 5 times at random moments of the sending phase and
/// restart each time with the same configuration, INSTANCE_ID included (as a crashed container
/// comes back in its pod). Nothing may be lost or stored twice; a letter may be delivered twice
/// only if its send reached the SMTP server and its outcome was not stored yet at a kill: at most
/// UNRECORDED_PER_WORKER (8) per worker per kill, the bound the README states.
///
/// Group membership is dynamic with a 6 s session timeout: tansu 0.6.0 does not settle a fresh
/// group of static members (`group.instance.id`): it assigns and at once revokes the partitions
/// ("rebalance in progress") every session timeout, for 40 s or more, which would eat the whole
/// time budget before the first letter. All letters are ingested before the first kill anyway.
#[tokio::test(flavor = "multi_thread")]
async fn kill_9_at_random_moments_loses_nothing_and_bounds_duplicates() {
    let _serial = chaos::serial().await;
    chaos::report_start("kill_9");
    let seed: u64 = std::env::var("FAULTS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| host_ms() as u64 ^ u64::from(std::process::id()));
    println!("kill -9 chaos: seed {seed} (set FAULTS_SEED={seed} to replay the same kill times)");
    let mut rng = StdRng::seed_from_u64(seed);

    // Sends take 20 ms, so some are in flight at every kill; the sink counts them as delivered.
    let sink = EagerSink::start(Duration::from_millis(20)).await;
    let senders = KILL_SENDERS.to_string();
    let mut app = spawn_on_port(
        sink.port,
        &[
            ("KAFKA_SESSION_TIMEOUT", "6s"),
            ("LEASE_DURATION", "4s"),
            ("SMTP_MAX_SENDERS", &senders),
            ("SMTP_RATE_LIMIT_PERIOD", "1s"),
            ("SMTP_RATE_LIMIT_MAX_LETTERS", "100000"),
            ("KAFKA_MESSAGE_TIMEOUT", "5s"),
            ("REPUBLISH_INTERVAL", "1s"),
        ],
    )
    .await;

    let feeder = Feeder::new();
    let mut expected = HashSet::new();
    for b in 0..KILL_BATCHES {
        let batch = batch(&format!("kill{b}"), KILL_PER_BATCH, 1);
        expected.extend(addresses_of(&batch));
        let key = format!("kill-key-{b}");
        feeder.send(&app.topic_in, None, Some(key.as_bytes()), Some(batch.to_string().as_bytes())).await;
    }
    let total = KILL_BATCHES * KILL_PER_BATCH;
    assert_eq!(expected.len(), total);

    // The first group join takes a few seconds; the kills are meant for the sending phase.
    let started = Instant::now();
    wait_letter_count(&app, total, LONG).await;
    wait_for("100 deliveries", LONG, || async { (sink.received().len() >= 100).then_some(()) }).await;
    let mut kill_notes = vec![format!("first 100 deliveries after {:.1}s", started.elapsed().as_secs_f64())];
    let mut kills_with_work_left = 0;
    for k in 1..=KILLS {
        let pause = rng.random_range(0.5..3.0);
        tokio::time::sleep(Duration::from_secs_f64(pause)).await;
        app.kill();
        let delivered = sink.received().len();
        let letters = app.letters().await;
        let unfinished = letters.iter().filter(|l| !chaos::is_final(l)).count() + (total - letters.len());
        if unfinished > 0 {
            kills_with_work_left += 1;
        }
        let note = format!(
            "kill {k} after {pause:.2}s (t={:.1}s): {delivered} deliveries so far, {} letters stored {:?}",
            started.elapsed().as_secs_f64(),
            letters.len(),
            tally(&letters)
        );
        println!("{note}");
        kill_notes.push(note);
        app.start().await;
    }
    assert!(
        kills_with_work_left >= KILLS - 1,
        "only {kills_with_work_left} of {KILLS} kills hit a running job: the run is too short to test anything"
    );

    let letters = match chaos::try_wait_all_final(&app, total, Duration::from_secs(30), Duration::from_secs(150)).await
    {
        Ok(letters) => letters,
        Err(failure) => {
            let instance = &app.env["INSTANCE_ID"];
            let renewed = app
                .letters()
                .await
                .iter()
                .filter(|l| {
                    l.status == Status::Processing
                        && l.owner.as_deref().is_some_and(|o| owned_by(o, instance))
                        && l.lease_ms.unwrap_or_default() > host_ms()
                })
                .count();
            let hint = if renewed > 0 {
                format!(
                    "\n{renewed} letters stay `processing` under {instance} with live leases: a killed incarnation \
                     claimed them and its successor, which has the same INSTANCE_ID, renews their leases without \
                     ever sending them"
                )
            } else {
                String::new()
            };
            report("kill_9", &[format!("FAILED after {KILLS} kills: {failure}{hint}")]);
            panic!("after {KILLS} kills: {failure}{hint}");
        }
    };
    let finished = started.elapsed();
    let not_sent: Vec<&Letter> = letters.iter().filter(|l| l.status != Status::Sent).collect();
    assert!(not_sent.is_empty(), "{} letters not sent, e.g. {:#?}", not_sent.len(), not_sent.first());
    let sources: HashSet<&str> = letters.iter().filter_map(|l| l.source.as_deref()).collect();
    assert_eq!(sources.len(), total, "every letter has its own source: no mailing stored twice");

    let received = sink.received();
    let counts = rcpt_counts(&received);
    let missing: Vec<&String> = expected.iter().filter(|a| !counts.contains_key(*a)).collect();
    let unknown: Vec<&String> = counts.keys().filter(|a| !expected.contains(*a)).collect();
    let duplicates: usize = counts.values().map(|n| n - 1).sum();
    // Sends in flight at a kill: letters handed to SMTP whose outcome was not stored yet, at
    // most UNRECORDED_PER_WORKER per worker.
    let bound = KILLS * KILL_SENDERS * mailsender::pipeline::send::UNRECORDED_PER_WORKER;

    // Every outcome reaches the status topic, even those whose publication a kill interrupted.
    let ids: HashSet<String> = letters.iter().map(|l| l.id.to_hex()).collect();
    let (seen, published) = status_ids(&app.topic_out, &ids, LONG).await;
    let unpublished = ids.difference(&seen).count();

    let mut lines = vec![
        format!("seed {seed}"),
        format!("letters {total} ({KILL_BATCHES} Kafka batches x {KILL_PER_BATCH}), SMTP_MAX_SENDERS {KILL_SENDERS}"),
    ];
    lines.extend(kill_notes);
    lines.extend([
        format!("kills {KILLS}, of which {kills_with_work_left} while letters were unfinished"),
        format!("all {total} letters sent after {:.1}s; distinct sources {}", finished.as_secs_f64(), sources.len()),
        format!(
            "deliveries {} to {} distinct addresses: duplicates {duplicates}, bound {bound} (kills x SMTP_MAX_SENDERS x unrecorded per worker)",
            received.len(),
            counts.len()
        ),
        format!("status messages {published}, letters without one {unpublished}"),
    ]);
    report("kill_9", &lines);

    assert!(missing.is_empty(), "{} addresses never reached the SMTP server, e.g. {:?}", missing.len(), &missing[..1]);
    assert!(unknown.is_empty(), "unexpected recipients {unknown:?}");
    assert!(
        duplicates <= bound,
        "{duplicates} duplicate deliveries exceed the bound of {bound} (sends in flight at {KILLS} kills)"
    );
    assert_eq!(unpublished, 0, "letters without a status message on {}", app.topic_out);
}

// ------------------------------------------------------------------------------------------------
// 2. replicas
// ------------------------------------------------------------------------------------------------

/// Three instances on one topic, database and group, each with its own SMTP sink: the work is
/// shared and no letter goes out twice. Then one replica (slow SMTP, so it holds leased letters)
/// is killed; the others send its letters once its leases expire, never before.
#[tokio::test(flavor = "multi_thread")]
async fn replicas_share_work_once_and_take_over_a_killed_replicas_letters() {
    let _serial = chaos::serial().await;
    chaos::report_start("replicas");
    // Eager sinks: a send in flight when its replica dies counts as delivered.
    let delay = Duration::from_millis(5);
    let sinks = [EagerSink::start(delay).await, EagerSink::start(delay).await, EagerSink::start(delay).await];
    let app = spawn_on_port(
        sinks[0].port,
        &[
            ("LEASE_DURATION", "4s"),
            ("KAFKA_SESSION_TIMEOUT", "6s"),
            ("SMTP_MAX_SENDERS", "4"),
            ("SMTP_RATE_LIMIT_PERIOD", "1s"),
            ("SMTP_RATE_LIMIT_MAX_LETTERS", "60"),
        ],
    )
    .await;
    let b = Replica::start(Replica::env_from(&app, &format!("{}-b", app.name), sinks[1].port)).await;
    let mut c = Replica::start(Replica::env_from(&app, &format!("{}-c", app.name), sinks[2].port)).await;
    let ids = [app.env["INSTANCE_ID"].clone(), b.instance_id.clone(), c.instance_id.clone()];

    // Phase 1: 600 letters, three replicas.
    let feeder = Feeder::new();
    let mut first = Vec::new();
    for n in 0..12 {
        let batch = batch(&format!("rep1-{n}"), 50, 1);
        first.extend(addresses_of(&batch));
        feeder
            .send(&app.topic_in, None, Some(format!("rep1-{n}").as_bytes()), Some(batch.to_string().as_bytes()))
            .await;
    }
    chaos::wait_all_final(&app, 600, Duration::from_secs(30), Duration::from_secs(90)).await;
    let per_sink: Vec<usize> = sinks.iter().map(|s| s.received().len()).collect();
    let all: Vec<Received> = sinks.iter().flat_map(|s| s.received()).collect();
    let counts = rcpt_counts(&all);
    let twice: Vec<(&String, &usize)> = counts.iter().filter(|(_, n)| **n > 1).collect();
    let missing = first.iter().filter(|a| !counts.contains_key(*a)).count();
    let mut lines = vec![format!("phase 1: 600 letters, deliveries per replica {per_sink:?} ({ids:?})")];
    println!("{}", lines[0]);
    assert!(twice.is_empty(), "letters delivered more than once by the replicas: {twice:?}");
    assert_eq!(missing, 0, "addresses never delivered");
    assert_eq!(all.len(), 600);
    assert!(
        per_sink.iter().filter(|n| **n > 0).count() >= 2,
        "the work was not shared: deliveries per replica {per_sink:?}"
    );

    // Phase 2: replica c becomes slow, so it holds leased letters; kill it while it does.
    // More letters than a and b can hold between them (each holds up to a lease's half of the
    // rate, 120, and as much again as half that for letters that go first: 360 in all), so c
    // claims some even when the batches land on a's and b's partitions and c learns of them
    // only at its next poll (300 letters were once all claimed by a and b within 0.3 s).
    sinks[2].set_delay(Duration::from_secs(3));
    let mut second = Vec::new();
    for n in 0..12 {
        let batch = batch(&format!("rep2-{n}"), 50, 1);
        second.extend(addresses_of(&batch));
        feeder
            .send(&app.topic_in, None, Some(format!("rep2-{n}").as_bytes()), Some(batch.to_string().as_bytes()))
            .await;
    }
    let c_id = c.instance_id.clone();
    let held: Vec<Letter> = wait_for("replica c to hold leased letters", LONG, || async {
        let letters = app.letters().await;
        if letters.len() < 1200 {
            return None;
        }
        let held: Vec<Letter> = letters
            .into_iter()
            .filter(|l| l.status == Status::Processing && l.owner.as_deref().is_some_and(|o| owned_by(o, &c_id)))
            .collect();
        (held.len() >= 4).then_some(held)
    })
    .await;
    let before_kill: HashSet<String> = {
        let (a, b) = (sinks[0].received(), sinks[1].received());
        rcpt_counts(a.iter().chain(b.iter())).into_keys().collect()
    };
    c.kill();
    let killed_at = Instant::now();
    let letters = chaos::wait_all_final(&app, 1200, Duration::from_secs(30), Duration::from_secs(90)).await;
    let takeover = killed_at.elapsed();

    let held_ids: HashSet<_> = held.iter().map(|l| l.id).collect();
    let unsent: Vec<&Letter> =
        letters.iter().filter(|l| held_ids.contains(&l.id) && l.status != Status::Sent).collect();
    assert!(unsent.is_empty(), "letters of the killed replica not sent: {unsent:#?}");
    let survivors: Vec<Received> = sinks[0].received().into_iter().chain(sinks[1].received()).collect();
    let survivor_counts = rcpt_counts(&survivors);
    let mut early = Vec::new();
    for letter in &held {
        let address = letter.addresses[0].to_lowercase();
        assert!(
            survivor_counts.contains_key(&address),
            "{address}, leased by the killed replica, was never sent by the others"
        );
        assert!(!before_kill.contains(&address), "{address} was sent by another replica while c held its lease");
        // The others may take it only once the lease c last wrote has run out.
        let lease_end = letter.lease_ms.unwrap_or_default() as f64 / 1000.0;
        for message in survivors.iter().filter(|m| m.rcpt_tos.iter().any(|r| r.to_lowercase() == address)) {
            if message.ts < lease_end - 0.2 {
                early.push(format!("{address} at {:.2} < lease end {lease_end:.2}", message.ts));
            }
        }
    }
    assert!(early.is_empty(), "letters taken over before their lease expired: {early:?}");

    let all: Vec<Received> = sinks.iter().flat_map(|s| s.received()).collect();
    let counts = rcpt_counts(&all);
    let missing = second.iter().filter(|a| !counts.contains_key(*a)).count();
    let duplicates: usize = second.iter().map(|a| counts.get(a).copied().unwrap_or(0).saturating_sub(1)).sum();
    lines.push(format!(
        "phase 2: 600 letters, c killed holding {} leased letters; all sent {:.1}s later; duplicates {duplicates} (bound: c's 4 senders x {})",
        held.len(),
        takeover.as_secs_f64(),
        mailsender::pipeline::send::UNRECORDED_PER_WORKER
    ));
    report("replicas", &lines);
    assert_eq!(missing, 0, "addresses never delivered after the kill");
    let bound = 4 * mailsender::pipeline::send::UNRECORDED_PER_WORKER;
    assert!(duplicates <= bound, "{duplicates} duplicates: more than the killed replica's {bound} sends in flight");
    drop(b);
}

// ------------------------------------------------------------------------------------------------
// 3. servers going away: broker, MongoDB-wire server, SMTP
// ------------------------------------------------------------------------------------------------

/// The broker stops mid-run and comes back (same data): every letter is sent, ingest resumes,
/// and every outcome reaches the status topic, those whose publication timed out through the
/// republisher.
#[tokio::test(flavor = "multi_thread")]
async fn broker_restart_mid_run_loses_no_letter_and_no_status_message() {
    let _serial = chaos::serial().await;
    chaos::report_start("broker_restart");
    let stack = Stack::from_env();
    let _restore = stack.guard();
    let sink = SmtpSink::start().await;
    let app = TestApp::spawn(
        &sink,
        &[
            ("KAFKA_MESSAGE_TIMEOUT", "5s"),
            ("REPUBLISH_INTERVAL", "2s"),
            ("KAFKA_SESSION_TIMEOUT", "6s"),
            ("SMTP_RATE_LIMIT_PERIOD", "1s"),
            ("SMTP_RATE_LIMIT_MAX_LETTERS", "25"),
        ],
    )
    .await;
    let feeder = Feeder::new();
    for n in 0..4 {
        let batch = batch(&format!("broker{n}"), 50, 1);
        feeder
            .send(&app.topic_in, None, Some(format!("broker-{n}").as_bytes()), Some(batch.to_string().as_bytes()))
            .await;
    }
    wait_letter_count(&app, 200, LONG).await;
    sink.wait_for_count(25, LONG).await;

    stack.stop(Server::Tansu, "TERM");
    let down = Instant::now();
    let at_stop = sink.received().len();
    // Letters are in MongoDB: sending goes on without the broker.
    sink.wait_for_count(at_stop + 25, Duration::from_secs(15)).await;
    tokio::time::sleep(Duration::from_secs(6).saturating_sub(down.elapsed())).await;
    let during = sink.received().len() - at_stop;
    let unreported_at_restart = app.raw_letters().await.iter().filter(|d| d.contains_key("unreported")).count();
    stack.up();
    let outage = down.elapsed();
    assert!(
        unreported_at_restart > 0,
        "no outcome was stored unreported during the outage: the republisher was not exercised"
    );

    // Ingest resumes once the broker is back.
    let feeder = Feeder::new();
    let late = batch("broker-late", 20, 1);
    feeder.send(&app.topic_in, None, Some(b"broker-late"), Some(late.to_string().as_bytes())).await;

    let letters = chaos::wait_all_final(&app, 220, Duration::from_secs(40), Duration::from_secs(120)).await;
    assert!(letters.iter().all(|l| l.status == Status::Sent), "{:?}", tally(&letters));
    let received = sink.received();
    let counts = rcpt_counts(&received);
    assert_eq!(counts.len(), 220, "every letter reached the SMTP server");
    let duplicates: usize = counts.values().map(|n| n - 1).sum();

    let ids: HashSet<String> = letters.iter().map(|l| l.id.to_hex()).collect();
    let (seen, published) = status_ids(&app.topic_out, &ids, Duration::from_secs(90)).await;
    let missing = ids.difference(&seen).count();
    let unreported = wait_for("every outcome marked reported", LONG, || async {
        let raw = app.raw_letters().await;
        let left = raw.iter().filter(|d| d.contains_key("unreported")).count();
        (left == 0).then_some(left)
    })
    .await;
    report(
        "broker_restart",
        &[format!(
            "broker down {:.1}s; {during} letters sent meanwhile, {unreported_at_restart} outcomes stored unreported; \
             220 sent, duplicates {duplicates}; {published} status messages for {} letters, missing {missing}, \
             unreported left {unreported}",
            outage.as_secs_f64(),
            ids.len()
        )],
    );
    assert_eq!(missing, 0, "letters whose outcome never reached {}", app.topic_out);
    assert_eq!(duplicates, 0, "a broker outage must not resend letters");
}

/// The MongoDB-wire server dies mid-run (kill -9) and comes back on the same data 4 s later (the
/// lease): nothing is lost, everything is sent, no letter is left in `processing`.
///
/// SMTP (4 workers x 500 ms = 8 letters/s) is slower than the rate limit (40/s) the claimer
/// sizes its holding on, so at the outage the instance holds more letters than it can send before
/// the leases it can no longer renew stop being trusted; those letters must come back once
/// MongoDB does.
#[tokio::test(flavor = "multi_thread")]
async fn mongo_restart_mid_run_loses_nothing_and_strands_no_letter() {
    let _serial = chaos::serial().await;
    chaos::report_start("mongo_restart");
    let stack = Stack::from_env();
    let _restore = stack.guard();
    let sink = SmtpSink::start().await;
    sink.control(json!({ "data_delay_s": 0.5 }));
    let app = TestApp::spawn(
        &sink,
        &[
            ("LEASE_DURATION", "4s"),
            ("SMTP_RATE_LIMIT_PERIOD", "1s"),
            ("SMTP_RATE_LIMIT_MAX_LETTERS", "40"),
            ("KAFKA_MESSAGE_TIMEOUT", "5s"),
            ("REPUBLISH_INTERVAL", "2s"),
        ],
    )
    .await;
    let feeder = Feeder::new();
    let mut expected = Vec::new();
    for n in 0..4 {
        let batch = batch(&format!("mongo{n}"), 25, 1);
        expected.extend(addresses_of(&batch));
        feeder
            .send(&app.topic_in, None, Some(format!("mongo-{n}").as_bytes()), Some(batch.to_string().as_bytes()))
            .await;
    }
    wait_letter_count(&app, 100, LONG).await;
    sink.wait_for_count(10, LONG).await;

    stack.stop(Server::Nx, "KILL");
    let down = Instant::now();
    let at_stop = sink.received().len();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let during = sink.received().len() - at_stop;
    stack.up();
    let outage = down.elapsed();

    // Ingest works again.
    let late = batch("mongo-late", 20, 1);
    expected.extend(addresses_of(&late));
    feeder.send(&app.topic_in, None, Some(b"mongo-late"), Some(late.to_string().as_bytes())).await;

    let result = chaos::try_wait_all_final(&app, 120, Duration::from_secs(25), Duration::from_secs(90)).await;
    let skipped = app.log().matches("lease no longer trusted").count();
    let letters = result.unwrap_or_else(|failure| {
        let failure = format!(
            "after a {:.1}s MongoDB outage ({skipped} letters skipped as untrusted): {failure}",
            outage.as_secs_f64()
        );
        report("mongo_restart", &[format!("FAILED {failure}")]);
        panic!("{failure}")
    });
    let received = sink.received();
    let counts = rcpt_counts(&received);
    let missing = expected.iter().filter(|a| !counts.contains_key(*a)).count();
    let duplicates: usize = counts.values().map(|n| n - 1).sum();
    report(
        "mongo_restart",
        &[format!(
            "nx down {:.1}s; {during} letters sent meanwhile, {skipped} skipped as untrusted; {:?}; missing {missing}, duplicates {duplicates}",
            outage.as_secs_f64(),
            tally(&letters)
        )],
    );
    assert!(letters.iter().all(|l| l.status == Status::Sent), "{:?}", tally(&letters));
    assert_eq!(missing, 0, "addresses never delivered");
    assert!(duplicates <= 4, "{duplicates} duplicates after a MongoDB outage");
    let (status, _) = app.get("/health").await;
    assert_eq!(status, 200);
}

/// The SMTP server is killed, then comes back on the same port refusing with a 421 greeting,
/// then answering 451 to the data, then healthy: letters are retried (attempts > 1, the 4xx
/// recorded as their last reply meanwhile) and finally all sent.
#[tokio::test(flavor = "multi_thread")]
async fn smtp_outage_and_4xx_replies_are_retried_until_sent() {
    let _serial = chaos::serial().await;
    chaos::report_start("smtp_outage");
    let mut sink = ChaosSink::start().await;
    let app = spawn_on_port(
        sink.port,
        &[
            ("SMTP_MAX_ATTEMPTS", "60"),
            ("RETRY_BACKOFF_BASE", "200ms"),
            ("RETRY_BACKOFF_MAX", "800ms"),
            ("SMTP_RATE_LIMIT_PERIOD", "1s"),
            ("SMTP_RATE_LIMIT_MAX_LETTERS", "20"),
            ("SMTP_TIMEOUT", "5s"),
        ],
    )
    .await;
    let feeder = Feeder::new();
    let mut expected = Vec::new();
    for n in 0..3 {
        let batch = batch(&format!("smtp{n}"), 40, 1);
        expected.extend(addresses_of(&batch));
        feeder
            .send(&app.topic_in, None, Some(format!("smtp-{n}").as_bytes()), Some(batch.to_string().as_bytes()))
            .await;
    }
    wait_for("some letters delivered", LONG, || async { (sink.received().len() >= 15).then_some(()) }).await;

    // Down: connections refused.
    sink.kill();
    let recorded = sink.received().len();
    let refused = letters_deferred_with(&app, "connecting to").await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Back on the same port, but closing every connection with 421.
    sink.control(json!({ "greeting": "421 4.3.2 Service not available, closing transmission channel" }));
    sink.restart().await;
    let greeted = letters_deferred_with(&app, "421").await;

    // Accepting connections, deferring every message with 451.
    sink.control(json!({ "data_reply": "451 4.3.0 Temporary local problem, try later" }));
    let deferred = letters_deferred_with(&app, "451").await;
    assert_eq!(sink.received().len(), recorded, "the sink recorded messages while it refused them");

    sink.control(json!({}));
    let letters = chaos::wait_all_final(&app, 120, Duration::from_secs(30), Duration::from_secs(120)).await;
    assert!(letters.iter().all(|l| l.status == Status::Sent), "{:?}", tally(&letters));
    assert!(letters.iter().all(|l| l.error.is_none()), "a sent letter keeps no error");
    let retried: Vec<&Letter> = letters.iter().filter(|l| l.attempts > 1).collect();
    let max_attempts = letters.iter().map(|l| l.attempts).max().unwrap_or_default();
    for letter in refused.iter().chain(&greeted).chain(&deferred) {
        let now = letters.iter().find(|l| l.id == letter.id).unwrap();
        assert!(now.attempts > 1, "{} was deferred but records {} attempt(s)", now.id, now.attempts);
    }
    assert!(retried.len() >= 9, "only {} letters record more than one attempt", retried.len());

    let received = sink.received();
    let counts = rcpt_counts(&received);
    let missing = expected.iter().filter(|a| !counts.contains_key(*a)).count();
    let duplicates: usize = counts.values().map(|n| n - 1).sum();
    assert_eq!(missing, 0, "addresses never delivered");
    assert!(duplicates <= 4, "{duplicates} duplicates: only a send cut by the kill may repeat");

    // The status messages carry the attempts.
    let ids: HashSet<String> = letters.iter().map(|l| l.id.to_hex()).collect();
    let messages = read_topic(&app.topic_out, LONG, |m| {
        let seen: HashSet<String> = m
            .iter()
            .filter_map(|m| Some(serde_json::from_slice::<Value>(&m.payload).ok()?["ID"].as_str()?.to_owned()))
            .collect();
        ids.is_subset(&seen)
    })
    .await;
    let statuses: HashMap<String, Value> =
        messages.iter().map(|m| m.json()).map(|v| (v["ID"].as_str().unwrap_or_default().to_owned(), v)).collect();
    assert!(ids.iter().all(|id| statuses.contains_key(id)), "missing status messages");
    let reported_retries = statuses.values().filter(|v| v["Attempts"].as_i64().unwrap_or_default() > 1).count();
    assert_eq!(reported_retries, retried.len(), "status messages report the same attempts as MongoDB");
    assert!(
        statuses.values().all(|v| v["Status"] == "sent" && v["LastReply"].as_str().unwrap_or("").starts_with("250"))
    );
    let example = |letters: &[Letter]| letters[0].last_reply.clone().unwrap_or_default();
    report(
        "smtp_outage",
        &[
            format!(
                "120 letters: {} retried (max attempts {max_attempts}), refused/421/451 seen on {}/{}/{} letters, duplicates {duplicates}",
                retried.len(),
                refused.len(),
                greeted.len(),
                deferred.len()
            ),
            format!(
                "last replies meanwhile: {:?} / {:?} / {:?}",
                example(&refused),
                example(&greeted),
                example(&deferred)
            ),
        ],
    );
}

/// Waits for at least three unfinished letters whose last attempt failed with `needle` in both
/// the last reply and the error.
async fn letters_deferred_with(app: &TestApp, needle: &str) -> Vec<Letter> {
    wait_for(&format!("letters deferred with {needle:?}"), LONG, || async {
        let hit: Vec<Letter> = app
            .letters()
            .await
            .into_iter()
            .filter(|l| {
                l.status != Status::Sent
                    && l.attempts >= 1
                    && l.last_reply.as_deref().is_some_and(|r| r.contains(needle))
                    && l.error.as_deref().is_some_and(|e| e.contains(needle))
            })
            .collect();
        (hit.len() >= 3).then_some(hit)
    })
    .await
}

// ------------------------------------------------------------------------------------------------
// 4. bad input
// ------------------------------------------------------------------------------------------------

/// What a bad input must become when it comes through Kafka.
enum ViaKafka {
    /// A dead letter whose `x-error` contains this.
    Dead(&'static str),
    /// One letter per mailing: its final status and a fragment of its error (or, for a sent
    /// letter, of a rejected address's reply; "" for none).
    Letters(Vec<(Status, &'static str)>),
}

/// What it must become when posted.
enum ViaHttp {
    /// 400 whose `error` contains this.
    Bad(&'static str),
    TooLarge,
}

struct BadInput {
    name: &'static str,
    body: Vec<u8>,
    http: ViaHttp,
    kafka: ViaKafka,
}

fn mailing(subject: &str, addresses: &[&str]) -> Value {
    json!({ "Subject": subject, "Body": "<p>body</p>", "Addresses": addresses, "Token": "tok" })
}

fn corpus() -> Vec<BadInput> {
    use ViaHttp::*;
    use ViaKafka::*;
    let json = |v: Value| v.to_string().into_bytes();
    let raw = |s: &str| s.as_bytes().to_vec();
    let dead_json = |name, body| BadInput { name, body, http: Bad("JSON"), kafka: Dead("JSON") };
    let error_letter = |name, body, http, error| BadInput {
        name,
        body,
        http: Bad(http),
        kafka: Letters(vec![(Status::Error, error)]),
    };
    let nested = format!("{}{}", "[".repeat(2000), "]".repeat(2000));
    let mut huge_garbage = b"{\"garbage\": \"".to_vec();
    huge_garbage.extend(std::iter::repeat_n(b'x', 900 * 1024));
    let huge_valid = json(json!([{
        "Subject": "huge", "Body": format!("<p>{}</p>", "y".repeat(900 * 1024)),
        "Addresses": ["huge-body@example.org"], "Token": "huge",
    }]));
    vec![
        dead_json("not JSON", raw("not json")),
        BadInput { name: "empty payload", body: Vec::new(), http: Bad("no payload"), kafka: Dead("no payload") },
        dead_json("null", raw("null")),
        dead_json("a number", raw("42")),
        dead_json("a string", raw("\"[]\"")),
        dead_json("a boolean", raw("true")),
        dead_json("an empty object", raw("{}")),
        dead_json("one mailing, not in an array", json(mailing("s", &["a@example.org"]))),
        BadInput { name: "empty array", body: raw("[]"), http: Bad("empty"), kafka: Dead("empty") },
        dead_json("[null]", raw("[null]")),
        dead_json("array of numbers", raw("[1,2,3]")),
        dead_json("array of empty arrays", raw("[[]]")),
        dead_json("2000 nested arrays", nested.into_bytes()),
        BadInput {
            name: "missing Token",
            body: json(json!([{ "Subject": "s", "Body": "b", "Addresses": ["a@example.org"] }])),
            http: Bad("Token"),
            kafka: Dead("Token"),
        },
        BadInput {
            name: "missing Addresses",
            body: json(json!([{ "Subject": "s", "Body": "b", "Token": "t" }])),
            http: Bad("Addresses"),
            kafka: Dead("Addresses"),
        },
        dead_json("missing Subject and Body", json(json!([{ "Addresses": ["a@example.org"], "Token": "t" }]))),
        dead_json(
            "Subject is a number",
            json(json!([{ "Subject": 5, "Body": "b", "Addresses": ["a@example.org"], "Token": "t" }])),
        ),
        dead_json(
            "Addresses is a string",
            json(json!([{ "Subject": "s", "Body": "b", "Addresses": "a@example.org", "Token": "t" }])),
        ),
        dead_json(
            "Addresses nested",
            json(json!([{ "Subject": "s", "Body": "b", "Addresses": [["a@example.org"]], "Token": "t" }])),
        ),
        dead_json(
            "an address is a number",
            json(json!([{ "Subject": "s", "Body": "b", "Addresses": [7], "Token": "t" }])),
        ),
        dead_json(
            "Token is null",
            json(json!([{ "Subject": "s", "Body": "b", "Addresses": ["a@example.org"], "Token": null }])),
        ),
        dead_json(
            "nested garbage as Body",
            json(json!([{ "Subject": "s", "Body": { "a": [1, { "b": [null, true, { "c": {} }] }] },
                          "Addresses": ["a@example.org"], "Token": "t" }])),
        ),
        dead_json("truncated JSON", raw(r#"[{"Subject":"s","Body":"b","Addresses":["a@exa"#)),
        dead_json(
            "trailing garbage",
            raw(r#"[{"Subject":"s","Body":"b","Addresses":["a@example.org"],"Token":"t"}] trailing"#),
        ),
        dead_json("non-UTF-8 bytes", b"\xff\xfe[\x00]".to_vec()),
        dead_json(
            "non-UTF-8 inside a string",
            b"[{\"Subject\":\"\xc3\x28\",\"Body\":\"b\",\"Addresses\":[\"a@example.org\"],\"Token\":\"t\"}]".to_vec(),
        ),
        dead_json("a byte-order mark before the JSON", {
            let mut body = b"\xef\xbb\xbf".to_vec();
            body.extend(json(json!([mailing("s", &["a@example.org"])])));
            body
        }),
        BadInput { name: "900 KB of garbage", body: huge_garbage, http: TooLarge, kafka: Dead("JSON") },
        BadInput {
            name: "a 900 KB letter",
            body: huge_valid,
            http: TooLarge,
            kafka: Letters(vec![(Status::Sent, "")]),
        },
        error_letter("empty Addresses", json(json!([mailing("s", &[])])), "Addresses is empty", "Addresses is empty"),
        error_letter(
            "not an address",
            json(json!([mailing("s", &["not-an-address"])])),
            "not-an-address",
            "no valid recipient",
        ),
        error_letter("empty address", json(json!([mailing("s", &[""])])), "empty", "no valid recipient"),
        error_letter("blank address", json(json!([mailing("s", &["   "])])), "invalid address", "no valid recipient"),
        error_letter(
            "address smuggling a RCPT command",
            json(json!([mailing("s", &["ok@example.org>\r\nRCPT TO:<evil-rcpt@evil.example"])])),
            "invalid address",
            "no valid recipient",
        ),
        error_letter(
            "address with a space",
            json(json!([mailing("s", &["evil space@evil.example"])])),
            "invalid address",
            "no valid recipient",
        ),
        error_letter(
            "CR/LF in Subject adding headers and a recipient",
            json(json!([mailing(
                "Hello\r\nBcc: evil-bcc@evil.example\r\nX-Injected: yes",
                &["crlf-target@example.org"]
            )])),
            "line break",
            "line break",
        ),
        error_letter(
            "bare LF in Subject",
            json(json!([mailing("Hello\nX-Injected: yes", &["lf-target@example.org"])])),
            "line break",
            "line break",
        ),
        error_letter(
            "NUL in Subject",
            json(json!([mailing("Hello\u{0}X-Injected: yes", &["nul-target@example.org"])])),
            "NUL",
            "NUL",
        ),
        BadInput {
            name: "good mailing, then one without a valid address",
            body: json(json!([mailing("fine", &["mixed-good@example.org"]), mailing("bad", &["nope"])])),
            http: Bad("mailing 1"),
            kafka: Letters(vec![(Status::Sent, ""), (Status::Error, "no valid recipient")]),
        },
        BadInput {
            name: "one bad address among good ones",
            body: json(json!([mailing("partly", &["partly-good@example.org", "bad address"])])),
            http: Bad("mailing 0"),
            kafka: Letters(vec![(Status::Sent, "invalid address")]),
        },
    ]
}

/// A small valid batch; every other one uses the lower-case keys and an unknown field, which
/// the Go service accepted too.
fn good_batch(tag: &str, n: usize) -> Value {
    if n.is_multiple_of(2) {
        batch(tag, 2, 1)
    } else {
        json!([
            { "subject": format!("{tag} a"), "body": "<p>a</p>", "addresses": [format!("{tag}-0-0@example.org")], "token": "a", "Extra": 1 },
            { "subject": format!("{tag} b"), "body": "<p>b</p>", "addresses": [format!("{tag}-1-0@example.org")], "token": "b", "Extra": [] },
        ])
    }
}

/// More than 30 malformed inputs, each posted and produced straight into the topic between
/// valid batches: each gets its clear error (400/413, a dead letter with the reason, or a
/// failed letter with the reason), every valid letter around them is sent, and the service
/// stays healthy. No input can add a recipient or a header.
#[tokio::test(flavor = "multi_thread")]
async fn bad_input_corpus_gets_clear_errors_and_blocks_nothing() {
    let _serial = chaos::serial().await;
    chaos::report_start("bad_input");
    let sink = SmtpSink::start().await;
    let app = TestApp::spawn(&sink, &[("HTTP_MAX_BODY_BYTES", "4096"), ("KAFKA_TOPIC_PARTITIONS", "1")]).await;
    let corpus = corpus();
    assert!(corpus.len() >= 30, "the corpus has {} inputs", corpus.len());
    let mut problems: Vec<String> = Vec::new();
    let mut good_addresses: Vec<String> = Vec::new();

    // Over HTTP, with a valid post after each bad one.
    let mut posted_keys = Vec::new();
    for (i, input) in corpus.iter().enumerate() {
        let (status, body) = post_tolerant(&app, input.body.clone()).await;
        let error = body["error"].as_str().unwrap_or_default();
        match input.http {
            ViaHttp::Bad(fragment) => {
                if status != 400
                    || !error.contains(fragment)
                    || !body["expected"].as_str().unwrap_or("").contains("Addresses")
                {
                    problems.push(format!(
                        "POST {:?}: expected 400 with an error mentioning {fragment:?} and `expected`, got {status} {body}",
                        input.name
                    ));
                }
            }
            ViaHttp::TooLarge => {
                if status != 413 || error.is_empty() {
                    problems.push(format!(
                        "POST {:?} ({} bytes): expected 413 with a JSON `error`, got {status} {body}",
                        input.name,
                        input.body.len()
                    ));
                }
            }
        }
        let good = good_batch(&format!("http-good{i}"), i);
        good_addresses.extend(addresses_of_any(&good));
        let (status, body) = app.post("/post", good.to_string()).await;
        assert_eq!(status, 202, "valid post after {:?}: {body}", input.name);
        posted_keys.push(body["key"].as_str().unwrap().to_owned());
    }

    // Through Kafka, all in one partition, in order: good, bad, good, bad, ..., good.
    let feeder = Feeder::new();
    let topic = app.topic_in.clone();
    let send_good = |n: usize| {
        let good = good_batch(&format!("kafka-good{n}"), n);
        (good.to_string(), addresses_of_any(&good))
    };
    let (first, addrs) = send_good(0);
    good_addresses.extend(addrs);
    feeder.send(&topic, Some(0), Some(b"good-0"), Some(first.as_bytes())).await;
    for (i, input) in corpus.iter().enumerate() {
        let key = format!("bad-{i}");
        let payload = (!input.body.is_empty()).then_some(input.body.as_slice());
        feeder.send(&topic, Some(0), Some(key.as_bytes()), payload).await;
        let (good, addrs) = send_good(i + 1);
        good_addresses.extend(addrs);
        feeder.send(&topic, Some(0), Some(format!("good-{}", i + 1).as_bytes()), Some(good.as_bytes())).await;
    }

    let expected_dead: Vec<(usize, &BadInput, &str)> = corpus
        .iter()
        .enumerate()
        .filter_map(|(i, b)| match b.kafka {
            ViaKafka::Dead(fragment) => Some((i, b, fragment)),
            ViaKafka::Letters(_) => None,
        })
        .collect();
    let letters_from_bad: usize =
        corpus.iter().map(|b| if let ViaKafka::Letters(l) = &b.kafka { l.len() } else { 0 }).sum();
    let good_letters = 2 * (corpus.len() + 1) + 2 * corpus.len();
    let total = good_letters + letters_from_bad;
    let letters = chaos::wait_all_final(&app, total, Duration::from_secs(30), Duration::from_secs(120)).await;

    // Dead letters: one per shape error, with the reason and where it came from.
    let dead = read_topic(&app.topic_dlq, LONG, |m| m.len() >= expected_dead.len()).await;
    if dead.len() != expected_dead.len() {
        problems.push(format!("{} dead letters, expected {}", dead.len(), expected_dead.len()));
    }
    for (i, input, fragment) in &expected_dead {
        let key = format!("bad-{i}");
        let Some(message) = dead.iter().find(|m| m.key.as_deref() == Some(key.as_str())) else {
            problems.push(format!("Kafka {:?}: no dead letter", input.name));
            continue;
        };
        let x_error = message.headers.get("x-error").cloned().unwrap_or_default();
        if !x_error.contains(fragment) {
            problems.push(format!("Kafka {:?}: x-error {x_error:?} does not mention {fragment:?}", input.name));
        }
        if message.payload != input.body {
            problems.push(format!("Kafka {:?}: dead letter payload differs from the input", input.name));
        }
        if message.headers.get("x-source-topic") != Some(&app.topic_in)
            || message.headers.get("x-source-partition").map(String::as_str) != Some("0")
            || message.headers.get("x-source-offset").and_then(|o| o.parse::<i64>().ok()).is_none()
        {
            problems.push(format!("Kafka {:?}: dead letter without its source: {:?}", input.name, message.headers));
        }
    }

    // Failed letters, and the good mailings of partly bad batches.
    for (i, input) in corpus.iter().enumerate() {
        let ViaKafka::Letters(expected) = &input.kafka else { continue };
        let key = format!("bad-{i}");
        let mut made: Vec<&Letter> = letters.iter().filter(|l| l.kafkakey == key).collect();
        made.sort_by_key(|l| l.source.as_deref().and_then(|s| s.rsplit('/').next()?.parse::<usize>().ok()));
        if made.len() != expected.len() {
            problems.push(format!("Kafka {:?}: {} letters, expected {}", input.name, made.len(), expected.len()));
            continue;
        }
        for (letter, (status, fragment)) in made.iter().zip(expected) {
            let reason = match status {
                Status::Sent => letter.rejected.iter().map(|r| r.reply.clone()).collect::<Vec<_>>().join("; "),
                _ => letter.error.clone().unwrap_or_default(),
            };
            if letter.status != *status || !reason.contains(fragment) {
                problems.push(format!(
                    "Kafka {:?}: letter {:?} with {reason:?}, expected {status:?} mentioning {fragment:?}",
                    input.name, letter.status
                ));
            }
        }
    }

    // Every valid letter around the bad ones was sent.
    let unsent: Vec<&Letter> = letters
        .iter()
        .filter(|l| (l.kafkakey.starts_with("good-") || posted_keys.contains(&l.kafkakey)) && l.status != Status::Sent)
        .collect();
    if !unsent.is_empty() {
        problems.push(format!("{} valid letters not sent: {:?}", unsent.len(), unsent.first()));
    }
    let received = sink.received();
    let counts = rcpt_counts(&received);
    let missing: Vec<&String> = good_addresses.iter().filter(|a| !counts.contains_key(*a)).collect();
    if !missing.is_empty() {
        problems.push(format!("valid addresses never delivered: {missing:?}"));
    }
    // Nothing injected: no extra recipient, no extra header.
    for message in &received {
        if let Some(evil) = message.rcpt_tos.iter().find(|r| r.contains("evil")) {
            problems.push(format!("injected recipient {evil} reached the SMTP server"));
        }
        if let Some((name, _)) = message.headers.iter().find(|(n, _)| {
            n.eq_ignore_ascii_case("bcc") || n.eq_ignore_ascii_case("x-injected") || n.eq_ignore_ascii_case("cc")
        }) {
            problems.push(format!("injected header {name} in a message to {:?}", message.rcpt_tos));
        }
    }
    for target in ["crlf-target@example.org", "lf-target@example.org", "nul-target@example.org"] {
        if counts.contains_key(target) {
            problems.push(format!("the letter with a line break in its Subject went out to {target}"));
        }
    }

    let (health, _) = app.get("/health").await;
    let (ready, ready_body) = app.get("/ready").await;
    if health != 200 || ready != 200 {
        problems.push(format!("after the corpus: /health {health}, /ready {ready} {ready_body}"));
    }
    report(
        "bad_input",
        &[format!(
            "{} inputs over HTTP and Kafka: {} dead letters, {} letters from bad batches, {} valid letters sent; problems {}",
            corpus.len(),
            dead.len(),
            letters_from_bad,
            good_letters,
            problems.len()
        )],
    );
    assert!(problems.is_empty(), "{} problems:\n  {}", problems.len(), problems.join("\n  "));
}

/// POST /post that reports a transport error (a server closing the connection on a large
/// body) as status 0 instead of panicking.
async fn post_tolerant(app: &TestApp, body: Vec<u8>) -> (u16, Value) {
    let sent = reqwest::Client::new()
        .post(format!("{}/post", app.http))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await;
    match sent {
        Ok(response) => {
            let status = response.status().as_u16();
            let text = response.text().await.unwrap_or_default();
            (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
        }
        Err(error) => (0, Value::String(format!("request failed: {error}"))),
    }
}

fn addresses_of_any(batch: &Value) -> Vec<String> {
    batch
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|m| {
            m.get("Addresses")
                .or_else(|| m.get("addresses"))
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(|a| a.as_str().unwrap().to_lowercase())
        })
        .collect()
}

/// With ADMIN_TOKEN set, /post and /halt refuse a missing or wrong bearer token and work with
/// the right one; the probes stay open.
#[tokio::test(flavor = "multi_thread")]
async fn admin_token_guards_post_and_halt() {
    let _serial = chaos::serial().await;
    let sink = SmtpSink::start().await;
    let token = "faults-admin-token-7f3a";
    let mut app = TestApp::spawn(&sink, &[("ADMIN_TOKEN", token)]).await;
    let client = reqwest::Client::new();
    let call = |path: &str, auth: Option<String>, body: String| {
        let mut request =
            client.post(format!("{}{path}", app.http)).header("content-type", "application/json").body(body);
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let text = response.text().await.unwrap();
            (status, serde_json::from_str::<Value>(&text).unwrap_or(Value::String(text)))
        }
    };
    let good = batch("admin", 1, 1).to_string();
    let wrong = [
        None,
        Some("Bearer wrong-token".to_owned()),
        Some(format!("Bearer {token}x")),
        Some(format!("Basic {token}")),
        Some(token.to_owned()),
    ];
    for path in ["/post", "/halt"] {
        for auth in &wrong {
            let (status, body) = call(path, auth.clone(), good.clone()).await;
            assert_eq!(status, 401, "{path} with {auth:?}: {body}");
            assert!(body["error"].is_string(), "{path} with {auth:?}: 401 without a JSON error: {body}");
        }
    }
    let (status, _) = app.get("/health").await;
    assert_eq!(status, 200, "still running after refused halts");
    assert!(sink.received().is_empty() && app.letters().await.is_empty(), "a refused post reached the topic");

    let (status, body) = call("/post", Some(format!("Bearer {token}")), good).await;
    assert_eq!(status, 202, "{body}");
    sink.wait_for_count(1, LONG).await;
    assert_eq!(app.wait_all_final(1, LONG).await.len(), 1, "only the authorised post became a letter");
    let (status, body) = call("/halt", Some(format!("Bearer {token}")), String::new()).await;
    assert_eq!(status, 202, "{body}");
    let exit = app.wait_exit(Duration::from_secs(30)).await;
    let log = app.log();
    let tail: Vec<&str> = log.lines().rev().take(4).collect();
    assert!(
        exit.success(),
        "an authorised /halt ended with {exit}; last log lines (newest first):\n{}",
        tail.join("\n")
    );
    assert!(!app.log().contains(token), "the admin token reached the log");
}

/// `/halt` returns this instance's leased letters to `awaiting` and never touches another
/// replica's, which keep their owner and are sent by it.
#[tokio::test(flavor = "multi_thread")]
async fn halt_reverts_only_its_own_letters() {
    let _serial = chaos::serial().await;
    let sink = SmtpSink::start().await;
    sink.control(json!({ "data_delay_s": 0.5 }));
    // 2 letters/s and a 6 s lease: each replica holds at most 6 letters, so both get some.
    let limits = [("SMTP_MAX_SENDERS", "2"), ("SMTP_RATE_LIMIT_PERIOD", "1s"), ("SMTP_RATE_LIMIT_MAX_LETTERS", "2")];
    let mut a = TestApp::spawn(&sink, &limits).await;
    let b = Replica::start(Replica::env_from(&a, &format!("{}-b", a.name), sink.port)).await;
    let (owner_a, owner_b) = (format!("{}-", a.env["INSTANCE_ID"]), format!("{}-", b.instance_id));
    let held_by = |letters: &[Letter], owner: &str| -> HashSet<String> {
        letters
            .iter()
            .filter(|l| l.status == Status::Processing && l.owner.as_deref().is_some_and(|o| o.starts_with(owner)))
            .map(|l| l.id.to_hex())
            .collect()
    };
    assert_eq!(a.post("/post", batch("halt-own", 24, 1).to_string()).await.0, 202);
    let letters = a
        .wait_for_letters("both replicas to hold letters", LONG, |letters| {
            !held_by(letters, &owner_a).is_empty() && !held_by(letters, &owner_b).is_empty()
        })
        .await;
    let held_by_b = held_by(&letters, &owner_b);

    assert_eq!(a.post("/halt", "").await.0, 202);
    let exit = a.wait_exit(LONG).await;
    assert!(exit.success(), "a exited with {exit}");
    let after = a.letters().await;
    assert!(held_by(&after, &owner_a).is_empty(), "a left letters processing after /halt");
    for letter in after.iter().filter(|l| held_by_b.contains(&l.id.to_hex())) {
        let kept = letter.status == Status::Sent
            || (letter.status == Status::Processing
                && letter.owner.as_deref().is_some_and(|o| o.starts_with(&owner_b)));
        assert!(kept, "a's /halt touched b's letter {}: {:?} owned by {:?}", letter.id, letter.status, letter.owner);
    }
    report(
        "halt_own",
        &[format!(
            "a held some letters, b held {} at a's /halt; b's kept their owner; a left none processing",
            held_by_b.len()
        )],
    );

    // b alone finishes everything, a's reverted letters included.
    sink.control(json!({}));
    let letters = a.wait_all_final(24, LONG).await;
    assert!(letters.iter().all(|l| l.status == Status::Sent));
    drop(b);
}

/// Two replicas whose hosts' clocks are 20 s apart agree on when a lease ends: the one ahead does
/// not reap (and send) the letters the other is sending.
#[tokio::test(flavor = "multi_thread")]
async fn replicas_with_clocks_apart_do_not_take_each_others_live_letters() {
    let _serial = chaos::serial().await;
    let sink = SmtpSink::start().await;
    sink.control(json!({ "data_delay_s": 0.7 }));
    // One worker at 0.7 s a letter: A holds its 12 letters (leased for 6 s, renewed every 2 s)
    // for about 8 s.
    let app = TestApp::spawn(&sink, &[("SMTP_MAX_SENDERS", "1"), ("LEASE_DURATION", "6s")]).await;
    assert_eq!(app.post("/post", batch("skew", 12, 1).to_string()).await.0, 202);
    app.wait_for_letters("letters leased by A", LONG, |l| {
        l.iter().filter(|l| l.status == Status::Processing).count() >= 10
    })
    .await;
    // B's host clock is 20 s ahead: by its own clock every lease A holds expired long ago.
    let mut env = Replica::env_from(&app, &format!("{}-b", app.name), sink.port);
    env.insert("MAILSENDER_FAULT_INJECTION".into(), "clock_skew_ms:20000".into());
    let b = Replica::start(env).await;

    let letters = app.wait_all_final(12, LONG).await;
    assert!(letters.iter().all(|l| l.status == Status::Sent));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let received = sink.received();
    let counts = rcpt_counts(&received);
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert_eq!(counts.len(), 12);
    assert!(twice.is_empty(), "sent twice: {twice:?}");
    let log = b.log();
    assert!(!log.contains("returned letters with expired leases"), "B reaped A's live letters");
    let metrics = reqwest::get(format!("{}/metrics", b.http)).await.unwrap().text().await.unwrap();
    let offset: f64 = metrics
        .lines()
        .find_map(|line| line.strip_prefix("mailsender_mongodb_clock_offset_seconds "))
        .and_then(|value| value.trim().parse().ok())
        .expect("the clock offset metric");
    assert!((-21.0..-19.0).contains(&offset), "B measured an offset of {offset} s");
}

/// The partitions whose lag `/metrics` reports, by their label.
async fn lag_partitions(http: &str) -> HashSet<String> {
    let metrics = reqwest::get(format!("{http}/metrics")).await.unwrap().text().await.unwrap();
    metrics
        .lines()
        .filter_map(|line| line.strip_prefix("mailsender_consumer_lag{partition=\""))
        .filter_map(|rest| rest.split('"').next().map(str::to_owned))
        .collect()
}

/// After a rebalance each partition's lag is reported by the replica that reads it, and only by
/// that one: a replica keeps no stale gauge for a partition it gave away.
#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_partition_leaves_the_replicas_metrics() {
    let _serial = chaos::serial().await;
    let sink = SmtpSink::start().await;
    let app = TestApp::spawn(&sink, &[("KAFKA_STATISTICS_INTERVAL", "1s"), ("KAFKA_SESSION_TIMEOUT", "6s")]).await;
    // Lag is known once a partition has a committed offset: a batch on each.
    for key in ["k0", "k1", "k2", "k3", "k4", "k5"] {
        app.produce(Some(key), batch(key, 1, 1).to_string().as_bytes()).await;
    }
    app.wait_all_final(6, LONG).await;
    wait_for("A reports both partitions", LONG, || async {
        (lag_partitions(&app.http).await.len() == 2).then_some(())
    })
    .await;
    let b = Replica::start(Replica::env_from(&app, &format!("{}-b", app.name), sink.port)).await;
    wait_for("B assigned a partition", LONG, || async { b.log().contains("partitions assigned").then_some(()) }).await;
    for key in ["k0", "k1", "k2", "k3", "k4", "k5"] {
        app.produce(Some(key), batch(&format!("{key}-again"), 1, 1).to_string().as_bytes()).await;
    }
    app.wait_all_final(12, LONG).await;
    let (a_parts, b_parts) = wait_for("each replica reports one partition", LONG, || async {
        let (a, b) = (lag_partitions(&app.http).await, lag_partitions(&b.http).await);
        eprintln!("A {a:?}, B {b:?}");
        (a.len() == 1 && b.len() == 1).then_some((a, b))
    })
    .await;
    assert!(a_parts.is_disjoint(&b_parts), "A {a_parts:?}, B {b_parts:?}");
}
