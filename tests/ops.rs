//! What operators rely on, checked with the tools they use: probes, Prometheus metrics through
//! `promtool`, the Postman collection through `newman`, JSON logs.

mod common;

use std::{process::Command, time::Duration};

use common::*;
use serde_json::Value;

const LONG: Duration = Duration::from_secs(60);

/// Runs `scripts/NAME` with `args` and `env`: whether it succeeded, and its output and errors.
fn script(name: &str, args: &[&str], env: &[(&str, std::ffi::OsString)]) -> (bool, String) {
    let output = Command::new("bash")
        .arg(repo_root().join("scripts").join(name))
        .args(args)
        .envs(env.iter().map(|(key, value)| (key, value)))
        .output()
        .unwrap_or_else(|error| panic!("running scripts/{name}: {error}"));
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}

fn check_artifacts(args: &[&str]) -> (bool, String) {
    script("check-artifacts.sh", args, &[])
}

#[tokio::test(flavor = "multi_thread")]
async fn probes_report_each_dependency() {
    let sink = SmtpSink::start().await;
    let app = TestApp::spawn(&sink, &[]).await;
    let (status, body) = app.get("/health").await;
    assert_eq!(status, 200, "{body}");

    let ready: Value = wait_for("readiness", LONG, || async {
        let (status, body) = app.get("/ready").await;
        (status == 200).then(|| serde_json::from_str(&body).unwrap())
    })
    .await;
    assert_eq!(ready["status"], "ready");
    for check in ["kafka", "mongo", "smtp", "consumer"] {
        assert_eq!(ready["checks"][check], "ok", "{ready}");
    }

    // The SMTP server goes away: readiness fails and names it, liveness does not.
    drop(sink);
    let not_ready: Value = wait_for("readiness to fail", LONG, || async {
        let (status, body) = app.get("/ready").await;
        (status == 503).then(|| serde_json::from_str(&body).unwrap())
    })
    .await;
    assert_eq!(not_ready["status"], "not ready");
    assert_ne!(not_ready["checks"]["smtp"], "ok", "{not_ready}");
    assert_eq!(not_ready["checks"]["mongo"], "ok", "{not_ready}");
    assert_eq!(app.get("/health").await.0, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_pass_promtool_and_count_what_happened() {
    let sink = SmtpSink::start().await;
    sink.control(serde_json::json!({ "rcpt_replies": { "refused@example.org": "550 5.1.1 no" } }));
    let app = TestApp::spawn(&sink, &[]).await;
    let mut batch = batch("metrics", 3, 1);
    batch.as_array_mut().unwrap().push(serde_json::json!({
        "Subject": "refused", "Body": "x", "Addresses": ["refused@example.org"], "Token": "t"
    }));
    assert_eq!(app.post("/post", batch.to_string()).await.0, 202);
    app.wait_all_final(4, LONG).await;

    let text = wait_for("metrics to count the letters", LONG, || async {
        let (_, text) = app.get("/metrics").await;
        (text.contains("mailsender_letters_sent_total 3") && text.contains("mailsender_status_published_total 4"))
            .then_some(text)
    })
    .await;
    for family in [
        "mailsender_letters_received_total 4",
        "mailsender_letters_stored_total 4",
        "mailsender_letters_failed_total{reason=\"recipients_refused\"} 1",
        "mailsender_send_duration_seconds_count 4",
        // Observed at each final dot: the refused letter's transaction never reached one.
        "mailsender_rate_limit_wait_seconds_count 3",
        "mailsender_sends_in_flight 0",
        "mailsender_build_info{version=",
        "mailsender_mongo_commands_total{command=\"insert\"}",
        "mailsender_mongo_commands_total{command=\"update\"}",
    ] {
        assert!(text.contains(family), "{family} missing from\n{text}");
    }

    let value = |name: &str| {
        metric_value(&text, name).map(|v| v as u64).unwrap_or_else(|| panic!("{name} missing from\n{text}"))
    };
    // MAIL + RCPT + DATA + message for the three sent; MAIL + RCPT + DATA (pipelined) and the
    // RSET that closes the refused transaction for the fourth; and one EHLO per connection.
    assert_eq!(value("mailsender_smtp_commands_total") - value("mailsender_smtp_connections_total"), 16, "{text}");

    let file = std::env::temp_dir().join(format!("{}-metrics.txt", app.name));
    std::fs::write(&file, &text).unwrap();
    let (ok, output) = check_artifacts(&["promtool", "--raw", file.to_str().unwrap()]);
    assert!(ok, "promtool check metrics failed:\n{output}");
}

#[tokio::test(flavor = "multi_thread")]
async fn postman_collection_passes_against_the_live_service() {
    let sink = SmtpSink::start().await;
    let mut app = TestApp::spawn(&sink, &[("ADMIN_TOKEN", "postman-secret")]).await;
    wait_for("readiness", LONG, || async { (app.get("/ready").await.0 == 200).then_some(()) }).await;

    let (ok, output) = check_artifacts(&["newman", &app.http, "postman-secret", "--with-halt"]);
    assert!(ok, "newman run failed:\n{output}");
    // The collection posts a batch of two mailings (and one held for its SendAt), then halts the service.
    let status = app.wait_exit(LONG).await;
    assert!(status.success(), "exit after /halt: {status}");
    // The halt may come before or after the posted letters went out; either way, what reached
    // the server is exactly what is recorded as sent, and nothing is left half done.
    let letters = app.letters().await;
    let sent = letters.iter().filter(|l| l.status == mailsender::model::Status::Sent).count();
    assert_eq!(sink.received().len(), sent, "{letters:?}");
    assert!(letters.iter().all(|l| l.status != mailsender::model::Status::Processing), "{letters:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn json_logs_carry_letter_id_and_source_key() {
    let sink = SmtpSink::start().await;
    let app = TestApp::spawn(&sink, &[("LOG_FORMAT", "json"), ("RUST_LOG", "info")]).await;
    app.produce(Some("log-key-7"), batch("logs", 2, 1).to_string().as_bytes()).await;
    let letters = app.wait_all_final(2, LONG).await;

    let log = wait_for("letter log lines", LONG, || async {
        let log = app.log();
        (log.matches("letter sent").count() >= 2).then_some(log)
    })
    .await;
    let lines: Vec<Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}")))
        .collect();
    let sent: Vec<&Value> = lines.iter().filter(|l| l["message"] == "letter sent").collect();
    assert_eq!(sent.len(), 2);
    for line in sent {
        let span = &line["span"];
        assert_eq!(span["kafka_key"], "log-key-7", "{line}");
        let id = span["letter_id"].as_str().unwrap();
        assert!(letters.iter().any(|l| l.id.to_hex() == id), "{line}");
        assert!(line["level"].is_string() && line["timestamp"].is_string(), "{line}");
    }
}

/// Stand-ins for the stack's servers, written where `scripts/stack.sh` looks for them under
/// `cache`. Each listens on the port its command line names. The broker's first process shows a
/// command line without its name for `broker_hidden_s` seconds, then execs into one that has it:
/// the state a real server is in for an instant during its exec (its `/proc/PID/cmdline` reads
/// empty), made to last so that a check made during it is certain to see it. With `broker_fails`,
/// the broker prints "boom" and exits instead.
fn fake_stack_servers(cache: &std::path::Path, broker_hidden_s: u32, broker_fails: bool) {
    use std::os::unix::fs::PermissionsExt;
    let write = |path: std::path::PathBuf, text: String| {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    let listen = cache.join("listen.py");
    write(
        listen.clone(),
        "import socket, sys\n\
         args = sys.argv[2:]\n\
         if '-p' in args:\n    port = int(args[args.index('-p') + 1])\n\
         else:\n    port = int(args[args.index('--listener-url') + 1].rsplit(':', 1)[1])\n\
         s = socket.socket()\n\
         s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('127.0.0.1', port))\n\
         s.listen()\n\
         while True:\n    s.accept()[0].close()\n"
            .to_string(),
    );
    let listen = listen.display();
    write(cache.join("venv/bin/nx-27017"), format!("#!/usr/bin/env bash\nexec python3 {listen} nx-27017 \"$@\"\n"));
    // The second stage lives outside `tansu/` and gets the arguments from the environment, so that
    // nothing in the first stage's command line names the broker.
    write(
        cache.join("stage2.sh"),
        format!("#!/usr/bin/env bash\nsleep {broker_hidden_s}\nexec python3 {listen} tansu $FAKE_ARGS\n"),
    );
    let broker = if broker_fails {
        "#!/usr/bin/env bash\necho boom >&2\nexit 3\n".to_string()
    } else {
        format!("#!/usr/bin/env bash\nFAKE_ARGS=\"$*\" exec -a starting bash {}\n", cache.join("stage2.sh").display())
    };
    write(cache.join("tansu/bin/tansu"), broker);
}

fn stack_sh(cache: &std::path::Path, kafka: u16, mongo: u16, args: &[&str]) -> (bool, String) {
    let env = [
        ("MAILSENDER_CACHE", cache.into()),
        ("MAILSENDER_RUN", cache.join("run").into()),
        ("KAFKA_PORT", kafka.to_string().into()),
        ("MONGO_PORT", mongo.to_string().into()),
    ];
    script("stack.sh", args, &env)
}

/// CI once failed at "tansu exited before listening" with the broker alive: `stack.sh` looked
/// for the broker's name in `/proc/PID/cmdline` while the launcher was exec'ing it, when that
/// file reads empty. A server it has just started is waited for while its process lives,
/// whatever its command line shows; one that exits is still reported at once, with its log.
#[test]
fn stack_waits_for_a_server_it_started_while_its_process_lives() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path();
    // The stand-ins find the broker's name in any path that holds it.
    assert!(!cache.display().to_string().contains("tansu"), "{}", cache.display());
    let kafka = free_port();
    // Two ports asked for one after the other may be the same, the first being free again.
    let mongo = std::iter::repeat_with(free_port).find(|port| *port != kafka).unwrap();
    // Stops the stand-ins even when an assertion fails.
    struct Down<'a>(&'a std::path::Path, u16, u16);
    impl Drop for Down<'_> {
        fn drop(&mut self) {
            stack_sh(self.0, self.1, self.2, &["down"]);
        }
    }
    let _down = Down(cache, kafka, mongo);

    fake_stack_servers(cache, 1, false);
    let (ok, output) = stack_sh(cache, kafka, mongo, &["up", "--no-maildev"]);
    assert!(ok, "stack.sh up failed:\n{output}");
    assert!(output.contains(&format!("KAFKA_BROKERS=127.0.0.1:{kafka}")), "{output}");
    std::net::TcpStream::connect(("127.0.0.1", kafka)).expect("the broker's stand-in listens");
    let (ok, output) = stack_sh(cache, kafka, mongo, &["down"]);
    assert!(ok && output.contains("tansu: stopped") && output.contains("nx: stopped"), "{output}");

    fake_stack_servers(cache, 0, true);
    let started = std::time::Instant::now();
    let (ok, output) = stack_sh(cache, kafka, mongo, &["up", "--no-maildev"]);
    assert!(!ok, "stack.sh up passed with a broker that exits:\n{output}");
    assert!(output.contains("tansu exited before listening") && output.contains("boom"), "{output}");
    assert!(started.elapsed() < Duration::from_secs(10), "{:?} to see the broker exit", started.elapsed());
}
