//! The operator API against the real binary and the local stack: the admin routes' network and
//! token guard, deployment-wide pause and resume across two replicas, cancelling a batch,
//! batch progress and letter lookup, retrying a batch's failed letters, and the OpenAPI document
//! checked against the live service.

#[path = "common/chaos.rs"]
mod chaos;
mod common;

use std::{
    collections::{BTreeMap, HashMap},
    process::Command,
    time::Duration,
};

use chaos::Replica;
use common::*;
use mailsender::model::Status;
use mongodb::bson::{Bson, doc, oid::ObjectId};
use serde_json::{Value, json};

const LONG: Duration = Duration::from_secs(90);

async fn request(method: &str, url: &str, token: Option<&str>, body: Option<String>) -> (u16, Value) {
    let client = reqwest::Client::new();
    let mut builder = match method {
        "GET" => client.get(url),
        "POST" => client.post(url),
        other => panic!("unexpected method {other}"),
    };
    if let Some(token) = token {
        builder = builder.header("authorization", format!("Bearer {token}"));
    }
    if let Some(body) = body {
        builder = builder.header("content-type", "application/json").body(body);
    }
    let response = builder.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// How often each recipient reached the SMTP server: a count, not a set, so duplicates show.
fn per_recipient(received: &[Received]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for message in received {
        for rcpt in &message.rcpt_tos {
            *counts.entry(rcpt.to_lowercase()).or_insert(0) += 1;
        }
    }
    counts
}

fn int(value: Option<&Bson>) -> i64 {
    match value {
        Some(Bson::Int32(n)) => i64::from(*n),
        Some(Bson::Int64(n)) => *n,
        _ => 0,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_routes_answer_only_allowed_networks_or_the_token() {
    let sink = SmtpSink::start().await;
    let batch = batch("guard", 1, 1).to_string();

    // Only 127.0.0.2 is allowed and the test connects from 127.0.0.1: every admin route refuses.
    let app = TestApp::spawn(&sink, &[("ADMIN_ALLOWED_NETWORKS", "127.0.0.2/32")]).await;
    for (method, path) in [
        ("POST", "/post"),
        ("POST", "/halt"),
        ("POST", "/pause"),
        ("POST", "/resume"),
        ("GET", "/batches/k"),
        ("POST", "/batches/k/cancel"),
        ("POST", "/batches/k/retry"),
        ("GET", "/letters/0123456789abcdef01234567"),
    ] {
        let (status, body) = request(method, &format!("{}{path}", app.http), None, Some(batch.clone())).await;
        assert_eq!(status, 403, "{method} {path}: {body}");
        assert!(body["error"].as_str().unwrap().contains("127.0.0.1"), "{method} {path}: {body}");
    }
    // Probes and metrics stay open, and the service is still running (the /halt was refused).
    for path in ["/health", "/metrics", "/"] {
        assert_eq!(app.get(path).await.0, 200, "{path}");
    }
    assert!(app.letters().await.is_empty(), "a refused /post produced nothing");
    drop(app);

    // Default networks: loopback is allowed.
    let app = TestApp::spawn(&sink, &[]).await;
    let (status, body) = app.post("/post", batch.clone()).await;
    assert_eq!(status, 202, "{body}");
    // And a real peer from outside loopback is refused: a replica on 0.0.0.0, reached through
    // this machine's own non-loopback address.
    let outside = Command::new("hostname").arg("-I").output().ok().and_then(|o| {
        String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .filter_map(|ip| ip.parse::<std::net::IpAddr>().ok())
            .find(|ip| ip.is_ipv4() && !ip.is_loopback())
    });
    match outside {
        Some(ip) => {
            let mut env = Replica::env_from(&app, &format!("{}-b", app.name), sink.port);
            let port = free_port();
            env.insert("HTTP_ADDR".into(), format!("0.0.0.0:{port}"));
            // Beyond loopback without a token, the networks must be chosen explicitly.
            env.insert("ADMIN_ALLOWED_NETWORKS".into(), "127.0.0.0/8,::1/128".into());
            let replica = Replica::start(env).await;
            let (status, body) = request("POST", &format!("http://{ip}:{port}/post"), None, Some(batch.clone())).await;
            assert_eq!(status, 403, "from {ip}: {body}");
            assert!(body["error"].as_str().unwrap().contains(&ip.to_string()), "{body}");
            assert_eq!(request("GET", &format!("http://{ip}:{port}/health"), None, None).await.0, 200);
            let (status, body) = request(
                "POST",
                &format!("{}/post", replica.http.replace("0.0.0.0", "127.0.0.1")),
                None,
                Some(batch.clone()),
            )
            .await;
            assert_eq!(status, 202, "the same replica from loopback: {body}");
        }
        None => eprintln!("no non-loopback IPv4 address here: the real-peer check is skipped"),
    }
    drop(app);

    // With a token, the network does not matter: 401 without it, served with it.
    let app = TestApp::spawn(&sink, &[("ADMIN_TOKEN", "s3cret"), ("ADMIN_ALLOWED_NETWORKS", "127.0.0.2/32")]).await;
    let url = format!("{}/post", app.http);
    let (status, body) = request("POST", &url, None, Some(batch.clone())).await;
    assert_eq!(status, 401, "{body}");
    let (status, body) = request("POST", &url, Some("wrong"), Some(batch.clone())).await;
    assert_eq!(status, 401, "{body}");
    let (status, body) = request("POST", &url, Some("s3cret"), Some(batch.clone())).await;
    assert_eq!(status, 202, "{body}");
    let (status, body) = request("GET", &format!("{}/batches/nothing", app.http), Some("s3cret"), None).await;
    assert_eq!(status, 404, "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn pause_holds_every_replica_across_a_restart_and_resume_sends_each_letter_once() {
    let sink = SmtpSink::start().await;
    sink.control(json!({ "data_delay_s": 0.2 }));
    // Small claims, so both replicas share the work and hold letters when the pause comes.
    let mut a = TestApp::spawn(&sink, &[("CLAIM_BATCH", "8")]).await;
    let b = Replica::start(Replica::env_from(&a, &format!("{}-b", a.name), sink.port)).await;

    for n in 0..6 {
        a.produce(Some(&format!("pause-{n}")), batch(&format!("p{n}"), 50, 1).to_string().as_bytes()).await;
    }
    sink.wait_for_count(40, LONG).await;
    let (status, body) = request("POST", &format!("{}/pause", b.http), None, None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["paused"], true, "{body}");

    // In-flight sends finish (0.2 s each) and both replicas read the pause within 0.5 s: after
    // 2 s nothing more reaches the server.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let at_pause = sink.received().len();
    assert!(at_pause < 300, "the pause came too late to test anything: {at_pause} sent");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(sink.received().len(), at_pause, "messages reached the server while paused");
    // Claimed letters that had not started went back to awaiting; nothing is held.
    let letters = a
        .wait_for_letters("300 letters stored, none held", LONG, |letters| {
            letters.len() == 300 && letters.iter().all(|l| l.status != Status::Processing)
        })
        .await;
    assert!(letters.iter().any(|l| l.status == Status::Awaiting), "nothing left to resume");
    // Both replicas were sending before the pause.
    assert!(a.log().contains("letter sent") && b.log().contains("letter sent"), "one replica sent nothing");
    // Ingest goes on while paused.
    a.produce(Some("pause-late"), batch("late", 20, 1).to_string().as_bytes()).await;
    a.wait_for_letters("the late batch stored while paused", LONG, |letters| letters.len() == 320).await;
    // Pausing is not a failure: both stay ready, and both show the state.
    for http in [&a.http, &b.http] {
        let (status, index) = request("GET", &format!("{http}/"), None, None).await;
        assert_eq!((status, &index["paused"]), (200, &json!(true)), "{index}");
        let ready = wait_for("ready while paused", LONG, || async {
            let (status, body) = request("GET", &format!("{http}/ready"), None, None).await;
            (status == 200).then_some(body)
        })
        .await;
        assert_eq!(ready["status"], "ready");
        let metrics = reqwest::get(format!("{http}/metrics")).await.unwrap().text().await.unwrap();
        assert!(metrics.contains("\nmailsender_paused 1\n"), "{metrics}");
    }

    // A replica restarted while paused stays paused.
    let pid = a.pid().unwrap().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    assert!(a.wait_exit(LONG).await.success());
    a.start().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(sink.received().len(), at_pause, "the restarted replica sent while paused");
    let (_, index) = request("GET", &format!("{}/", a.http), None, None).await;
    assert_eq!(index["paused"], true, "the restarted replica read the pause: {index}");

    let (status, body) = request("POST", &format!("{}/resume", a.http), None, None).await;
    assert_eq!((status, &body["paused"]), (200, &json!(false)), "{body}");
    let letters = a.wait_all_final(320, LONG).await;
    assert!(letters.iter().all(|l| l.status == Status::Sent), "{letters:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let counts = per_recipient(&sink.received());
    assert_eq!(counts.len(), 320, "every recipient reached");
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "sent more than once: {twice:?}");
    assert_eq!(sink.received().len(), 320);
    let (_, index) = request("GET", &format!("{}/", b.http), None, None).await;
    assert_eq!(index["paused"], false);
}

#[tokio::test(flavor = "multi_thread")]
async fn cancelling_a_batch_ends_its_waiting_letters_and_reports_them() {
    let sink = SmtpSink::start().await;
    sink.control(json!({ "data_delay_s": 0.25 }));
    // Most of the batch is still awaiting when the cancel comes; the few a replica claimed
    // (at most 2 × CLAIM_BATCH) end cancelled by the worker instead of being sent.
    let app = TestApp::spawn(&sink, &[("SMTP_MAX_SENDERS", "2"), ("CLAIM_BATCH", "2")]).await;
    app.produce(Some("cancel-me"), batch("cancel", 40, 1).to_string().as_bytes()).await;
    app.produce(Some("keep-me"), batch("keep", 10, 1).to_string().as_bytes()).await;
    wait_for("some of the batch sent", LONG, || async {
        let sent = sink.received().iter().filter(|m| m.rcpt_tos[0].starts_with("cancel-")).count();
        (sent >= 3).then_some(())
    })
    .await;

    let (status, body) = request("POST", &format!("{}/batches/cancel-me/cancel", app.http), None, None).await;
    assert_eq!(status, 200, "{body}");
    let cancelled = body["cancelled"].as_u64().unwrap();
    assert!(cancelled > 0 && cancelled < 40, "{body}");
    assert_eq!(body["published"], body["cancelled"], "{body}");

    let letters = app.wait_all_final(50, LONG).await;
    let of = |key: &'static str| letters.iter().filter(move |l| l.kafkakey == key);
    assert!(of("keep-me").all(|l| l.status == Status::Sent), "another key's letters are unaffected");
    let ended: Vec<_> = of("cancel-me").filter(|l| l.error.as_deref() == Some("cancelled")).collect();
    assert!(ended.len() as u64 >= cancelled);
    assert!(ended.iter().all(|l| l.status == Status::Error && l.unreported.is_none()));
    let cancelled = ended.len() as u64;
    assert_eq!(of("cancel-me").filter(|l| l.status == Status::Sent).count() as u64, 40 - cancelled);
    // No cancelled recipient reached the server.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let counts = per_recipient(&sink.received());
    for letter in &ended {
        assert!(!counts.contains_key(&letter.addresses[0].to_lowercase()), "{} was sent", letter.addresses[0]);
    }
    assert_eq!(counts.len() as u64, 50 - cancelled);

    // Every letter's status message, the cancelled ones with their reason.
    let messages = app.consume(&app.topic_out, 50, LONG).await;
    let cancelled_messages: Vec<Value> = messages
        .iter()
        .map(Consumed::json)
        .filter(|m| m["KafkaKey"] == "cancel-me" && m["Status"] == "error" && m["Error"] == "cancelled")
        .collect();
    assert_eq!(cancelled_messages.len() as u64, cancelled);

    let (status, body) = request("POST", &format!("{}/batches/cancel-me/cancel", app.http), None, None).await;
    assert_eq!((status, &body["cancelled"]), (200, &json!(0)), "nothing left to cancel: {body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn pause_then_cancel_cuts_a_batch_cleanly_even_when_it_is_all_claimed() {
    let sink = SmtpSink::start().await;
    sink.control(json!({ "data_delay_s": 0.25 }));
    // A slow rate (2 a second) and a long lease: the replica holds the whole batch as soon as it
    // is stored (half a lease's worth of sends), and releasing at the sending rate would take 15 s.
    let app = TestApp::spawn(
        &sink,
        &[("SMTP_MAX_SENDERS", "2"), ("SMTP_RATE_LIMIT_MAX_LETTERS", "2"), ("LEASE_DURATION", "30s")],
    )
    .await;
    app.produce(Some("cut-me"), batch("cut", 30, 1).to_string().as_bytes()).await;
    sink.wait_for_count(2, LONG).await;
    assert_eq!(request("POST", &format!("{}/pause", app.http), None, None).await.0, 200);
    // The pause returns what the workers had not started to awaiting, at once...
    app.wait_for_letters("no letter held", Duration::from_secs(3), |letters| {
        letters.len() == 30 && letters.iter().all(|l| l.status != Status::Processing)
    })
    .await;
    let (status, body) = request("POST", &format!("{}/batches/cut-me/cancel", app.http), None, None).await;
    assert_eq!(status, 200, "{body}");
    // ...so the cancel reaches every letter not sent.
    let sent = sink.received().len() as u64;
    assert!(sent <= 10, "{sent} of 30 sent: the pause did not stop the letters already claimed");
    assert_eq!(body["cancelled"].as_u64().unwrap(), 30 - sent, "{body}");
    assert_eq!(request("POST", &format!("{}/resume", app.http), None, None).await.0, 200);
    let letters = app.wait_all_final(30, LONG).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(sink.received().len() as u64, sent, "a cancelled letter was sent after resume");
    assert_eq!(letters.iter().filter(|l| l.error.as_deref() == Some("cancelled")).count() as u64, 30 - sent);
}

/// The progress of `key` computed from the raw documents, as the API should report it.
async fn progress_from_database(app: &TestApp, key: &str) -> Value {
    let documents: Vec<_> = app.raw_letters().await.into_iter().filter(|d| d.get_str("kafkakey") == Ok(key)).collect();
    let status = |s: &str| documents.iter().filter(|d| d.get_str("status") == Ok(s)).count();
    let len = |d: &mongodb::bson::Document, field: &str| d.get_array(field).map_or(0, Vec::len);
    let updated: Vec<i64> = documents.iter().map(|d| int(d.get("updated_ms"))).collect();
    json!({
        "letters": documents.len(),
        "awaiting": status("awaiting"),
        "processing": status("processing"),
        "sent": status("sent"),
        "error": status("error"),
        "cancelled": documents.iter().filter(|d| d.get_str("error") == Ok("cancelled")).count(),
        "recipients_delivered": documents.iter().map(|d| len(d, "delivered")).sum::<usize>(),
        "recipients_refused": documents.iter().map(|d| len(d, "rejected")).sum::<usize>(),
        "first_update_ms": updated.iter().min(),
        "last_update_ms": updated.iter().max(),
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn progress_lookup_and_retry_of_failed_letters() {
    let sink = SmtpSink::start().await;
    sink.control(json!({ "data_reply": "554 5.7.1 refused for now" }));
    let app = TestApp::spawn(&sink, &[]).await;
    app.produce(Some("retry-key"), batch("retry", 5, 2).to_string().as_bytes()).await;
    app.produce(Some("other-key"), batch("other", 3, 1).to_string().as_bytes()).await;
    // A key that is not UTF-8, addressed by its bytes in base64 (here "/v8Aaw==").
    let binary: &[u8] = &[0xfe, 0xff, 0x00, b'k'];
    produce_bytes(&app.topic_in, Some(binary), batch("binary", 2, 1).to_string().as_bytes()).await;
    let letters = app.wait_all_final(10, LONG).await;
    assert!(letters.iter().all(|l| l.status == Status::Error), "{letters:?}");

    let progress = |key: &'static str| {
        let url = format!("{}/batches/{key}", app.http);
        async move { request("GET", &url, None, None).await }
    };
    let (status, body) = progress("retry-key").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, progress_from_database(&app, "retry-key").await);
    assert_eq!((&body["letters"], &body["error"], &body["recipients_refused"]), (&json!(5), &json!(5), &json!(10)));
    assert_eq!(progress("no-such-key").await.0, 404);
    let by_bytes = |query: &str| {
        let url = format!("{}/batches/-?key_b64={query}", app.http);
        async move { request("GET", &url, None, None).await }
    };
    let (status, body) = by_bytes("%2Fv8Aaw%3D%3D").await;
    assert_eq!((status, &body["letters"], &body["error"]), (200, &json!(2), &json!(2)), "{body}");
    // Any key may be given as bytes: "retry-key" in base64 is the same batch as the path.
    let (status, body) = by_bytes("cmV0cnkta2V5").await;
    assert_eq!((status, &body["letters"]), (200, &json!(5)), "{body}");
    assert_eq!(by_bytes("not*base64").await.0, 400);

    // Lookup: the letter without its body, with per-recipient outcomes; 404 and 400 otherwise.
    let letter = letters.iter().find(|l| l.kafkakey == "retry-key").unwrap();
    let (status, view) = request("GET", &format!("{}/letters/{}", app.http, letter.id.to_hex()), None, None).await;
    assert_eq!(status, 200, "{view}");
    assert!(view.get("body").is_none() && view.get("Body").is_none(), "{view}");
    assert_eq!(
        (&view["status"], &view["attempts"], &view["kafka_key"]),
        (&json!("error"), &json!(1), &json!("retry-key"))
    );
    // The DATA refusal is the letter's error (a refusal of the message, not of a recipient).
    assert!(view["error"].as_str().unwrap().contains("554"), "{view}");
    assert!(view.get("last_reply").is_some(), "{view}");
    let recipients = view["recipients"].as_array().unwrap();
    assert_eq!(recipients.len(), 2, "{view}");
    assert!(recipients.iter().all(|r| r["outcome"] == "refused" && r["reply"].as_str().unwrap().contains("554")));
    let unknown = ObjectId::new().to_hex();
    assert_eq!(request("GET", &format!("{}/letters/{unknown}", app.http), None, None).await.0, 404);
    assert_eq!(request("GET", &format!("{}/letters/not-an-id", app.http), None, None).await.0, 400);

    // An earlier attempt delivered each letter's first recipient (as a split transaction can).
    for letter in letters.iter().filter(|l| l.kafkakey == "retry-key") {
        let first = letter.addresses[0].clone();
        app.update_raw(doc! { "_id": letter.id }, doc! { "$set": { "delivered": [first] } }).await;
    }
    sink.control(json!({}));
    let (status, body) = request("POST", &format!("{}/batches/retry-key/retry", app.http), None, None).await;
    assert_eq!((status, &body["retried"]), (200, &json!(5)), "{body}");
    let letters = app
        .wait_for_letters("the retried letters sent", LONG, |letters| {
            letters.iter().filter(|l| l.kafkakey == "retry-key").all(|l| l.status == Status::Sent)
        })
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let counts = per_recipient(&sink.received());
    let expected: BTreeMap<String, usize> = (0..5).map(|i| (format!("retry-{i}-1@example.org"), 1)).collect();
    assert_eq!(counts, expected, "only the recipients not yet delivered, once each");
    for letter in letters.iter().filter(|l| l.kafkakey == "retry-key") {
        assert_eq!((letter.attempts, letter.delivered.len(), letter.rejected.len()), (1, 2, 0), "{letter:?}");
    }
    assert!(letters.iter().filter(|l| l.kafkakey == "other-key").all(|l| l.status == Status::Error));
    let (_, body) = progress("retry-key").await;
    assert_eq!(body, progress_from_database(&app, "retry-key").await);
    assert_eq!(
        (&body["sent"], &body["recipients_delivered"], &body["recipients_refused"]),
        (&json!(5), &json!(10), &json!(0))
    );
}

/// YAML to JSON through a Python with PyYAML: the tools venv of scripts/check-artifacts.sh, or
/// the system's.
fn yaml_to_json(yaml: &str) -> Value {
    use std::io::Write as _;
    let cache = std::env::var("MAILSENDER_CACHE")
        .unwrap_or_else(|_| format!("{}/.cache/mailsender", std::env::var("HOME").unwrap_or_default()));
    let python = [format!("{cache}/venv-tools/bin/python"), "python3".to_owned(), python()]
        .into_iter()
        .find(|p| Command::new(p).args(["-c", "import yaml"]).status().is_ok_and(|s| s.success()))
        .expect("a Python with PyYAML");
    let mut child = Command::new(python)
        .args(["-c", "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python with PyYAML");
    child.stdin.take().unwrap().write_all(yaml.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "the OpenAPI document is not YAML");
    serde_json::from_slice(&output.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_openapi_document_matches_the_live_service() {
    let sink = SmtpSink::start().await;
    let app = TestApp::spawn(&sink, &[("ADMIN_TOKEN", "openapi-secret")]).await;
    wait_for("readiness", LONG, || async { (app.get("/ready").await.0 == 200).then_some(()) }).await;
    let (status, served) = app.get("/openapi.yaml").await;
    assert_eq!(status, 200);
    let file = std::fs::read_to_string(repo_root().join("docs/openapi.yaml")).unwrap();
    assert_eq!(served, file, "the service serves docs/openapi.yaml");
    let spec = yaml_to_json(&file);
    assert!(spec["openapi"].as_str().unwrap().starts_with("3."), "{spec}");

    let mut documented = Vec::new();
    for (path, item) in spec["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            if ["get", "post"].contains(&method.as_str()) {
                documented.push((method.to_uppercase(), path.clone(), operation.clone()));
            }
        }
    }
    // Every route the service lists is documented, and nothing else.
    let (_, index) = request("GET", &format!("{}/", app.http), None, None).await;
    let mut served: Vec<String> =
        index["endpoints"].as_array().unwrap().iter().map(|e| e.as_str().unwrap().to_owned()).collect();
    let mut listed: Vec<String> = documented.iter().map(|(m, p, _)| format!("{m} {p}")).collect();
    served.sort();
    listed.sort();
    assert_eq!(served, listed, "GET / lists exactly the documented operations");

    // Every documented operation answers with a documented status ( /halt last: it stops the app).
    documented.sort_by_key(|(_, path, _)| path == "/halt");
    let letter_id = ObjectId::new().to_hex();
    let mut answered = HashMap::new();
    for (method, path, operation) in &documented {
        let url = format!("{}{}", app.http, path.replace("{key}", "openapi-probe").replace("{id}", &letter_id));
        let body = operation["requestBody"]["content"]["application/json"]["example"].clone();
        let body = (!body.is_null()).then(|| body.to_string());
        let (status, reply) = request(method, &url, Some("openapi-secret"), body).await;
        let codes: Vec<&String> = operation["responses"].as_object().unwrap().keys().collect();
        assert!(
            codes.iter().any(|c| **c == status.to_string()),
            "{method} {path} answered {status}, documented {codes:?}: {reply}"
        );
        assert!(
            operation["responses"]["401"].is_object()
                || ["/health", "/ready", "/metrics", "/", "/openapi.yaml"].contains(&path.as_str()),
            "{method} {path}: admin operations document 401"
        );
        answered.insert(format!("{method} {path}"), status);
        // The guard answers as documented too.
        if operation["responses"]["401"].is_object() && path != "/halt" {
            assert_eq!(request(method, &url, None, None).await.0, 401, "{method} {path} without the token");
        }
    }
    assert_eq!(answered.len(), documented.len());
    assert_eq!(answered["POST /halt"], 202);
    let (status, reply) = request("GET", &format!("{}/no/such/route", app.http), None, None).await;
    assert_eq!(status, 404, "{reply}");
}
