//! The HTTP API's edges against the real binary: an admin API that would be open to a service
//! mesh refuses to start; `POST /post` produces a batch once per `Idempotency-Key`; and a `503`
//! from `/post` means the batch will not be produced, even once the broker is back.

#[path = "common/chaos.rs"]
mod chaos;
mod common;

use std::{
    collections::{BTreeSet, HashMap},
    fs,
    net::TcpStream,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::*;
use rdkafka::{
    ClientConfig,
    consumer::{BaseConsumer, Consumer},
};
use serde_json::Value;

async fn post(app: &TestApp, body: &str, idempotency_key: Option<&str>) -> (u16, Value, HashMap<String, String>) {
    post_to(&app.http, body, idempotency_key).await
}

async fn post_to(http: &str, body: &str, idempotency_key: Option<&str>) -> (u16, Value, HashMap<String, String>) {
    let mut request = reqwest::Client::new()
        .post(format!("{http}/post"))
        .header("content-type", "application/json")
        .body(body.to_owned());
    if let Some(key) = idempotency_key {
        request = request.header("idempotency-key", key);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .map(|(name, value)| (name.as_str().to_owned(), value.to_str().unwrap_or_default().to_owned()))
        .collect();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)), headers)
}

/// How many messages `topic` holds, from the partitions' watermarks: exact, and no waiting for a
/// reader to go quiet.
fn message_count(brokers: &str, topic: &str) -> i64 {
    let consumer: BaseConsumer =
        ClientConfig::new().set("bootstrap.servers", brokers).set("group.id", unique("count-")).create().unwrap();
    let timeout = Duration::from_secs(10);
    let metadata = consumer.fetch_metadata(Some(topic), timeout).unwrap();
    let partitions = metadata.topics()[0].partitions();
    assert!(!partitions.is_empty(), "{topic} has no partitions");
    partitions
        .iter()
        .map(|p| {
            let (low, high) = consumer.fetch_watermarks(topic, p.id(), timeout).unwrap();
            high - low
        })
        .sum()
}

/// The keys of the messages on `topic`, read from the beginning.
async fn keys_on(brokers: &str, topic: &str, count: usize) -> BTreeSet<String> {
    use rdkafka::{Message, consumer::StreamConsumer};
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("reader-"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut keys = BTreeSet::new();
    for _ in 0..count {
        let message = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .unwrap_or_else(|_| panic!("timed out with {} of {count} messages on {topic}", keys.len()))
            .unwrap();
        keys.insert(String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned());
    }
    keys
}

#[tokio::test(flavor = "multi_thread")]
async fn an_admin_api_open_beyond_loopback_without_a_guard_refuses_to_start() {
    let name = unique("open");
    let mut command = Command::new(env!("CARGO_BIN_EXE_mailsender"));
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs([
            ("KAFKA_BROKERS", brokers()),
            ("KAFKA_TOPIC_MAILSENDER", format!("{name}-in")),
            ("KAFKA_TOPIC_PROFILE", format!("{name}-out")),
            ("KAFKA_TOPIC_DLQ", format!("{name}-in.dlq")),
            ("KAFKA_GROUPID", format!("{name}-group")),
            ("MONGO_LOCAL", mongo_uri()),
            ("MONGODB_BASE_NAME", format!("{name}_db")),
            ("SMTP_HOST", "127.0.0.1".into()),
            ("SMTP_TLS", "none".into()),
            ("SMTP_FROM", "noreply@mailsender.test".into()),
            // Every interface, as in a pod, and neither ADMIN_TOKEN nor ADMIN_ALLOWED_NETWORKS.
            ("HTTP_ADDR", format!("0.0.0.0:{}", free_port())),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let output = child.wait_with_output().unwrap();
            panic!(
                "mailsender started with an unguarded admin API on 0.0.0.0; its log:\n{}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!status.success(), "exit status {status}");
    for named in ["HTTP_ADDR", "ADMIN_TOKEN", "ADMIN_ALLOWED_NETWORKS", "service mesh", "127.0.0.6"] {
        assert!(stderr.contains(named), "{named} not in the message: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_repeated_idempotency_key_produces_nothing_new() {
    let sink = SmtpSink::start().await;
    let app = TestApp::spawn(&sink, &[]).await;
    let body = batch("idem", 2, 1).to_string();

    let (status, first, _) = post(&app, &body, Some("campaign-42")).await;
    assert_eq!(status, 202, "{first}");
    let (status, again, headers) = post(&app, &body, Some("campaign-42")).await;
    assert_eq!(status, 202, "{again}");
    assert_eq!(again, first, "a repeat is answered with the first answer");
    assert_eq!(headers.get("idempotent-replayed").map(String::as_str), Some("true"));
    // The draft standard's quoted form is the same key.
    let (status, quoted, _) = post(&app, &body, Some("\"campaign-42\"")).await;
    assert_eq!((status, &quoted), (202, &first));
    // Another replica (same database and topics) knows the key too.
    let replica = chaos::Replica::start(chaos::Replica::env_from(&app, &format!("{}-b", app.name), sink.port)).await;
    let (status, elsewhere, _) = post_to(&replica.http, &body, Some("campaign-42")).await;
    assert_eq!((status, &elsewhere), (202, &first), "on another replica");

    // The same key with another body is refused; nothing is produced for it.
    let (status, other, _) = post(&app, &batch("other", 1, 1).to_string(), Some("campaign-42")).await;
    assert_eq!(status, 422, "{other}");

    // Another key is another batch.
    let (status, second, _) = post(&app, &body, Some("campaign-43")).await;
    assert_eq!(status, 202, "{second}");
    assert_ne!(second["key"], first["key"]);

    // One key sent to both replicas at once: one of them produces, the other answers the same
    // key or says the first is still waiting.
    let (a, b) = tokio::join!(
        post_to(&app.http, &body, Some("campaign-44")),
        post_to(&replica.http, &body, Some("campaign-44"))
    );
    let answers: Vec<&Value> =
        [&a, &b].iter().filter(|(status, ..)| *status == 202).map(|(_, answer, _)| answer).collect();
    assert!([&a, &b].iter().all(|(status, ..)| [202, 409].contains(status)), "{a:?} {b:?}");
    assert!(!answers.is_empty() && answers.iter().all(|answer| *answer == answers[0]), "{a:?} {b:?}");
    let third = answers[0].clone();

    let keys = keys_on(&brokers(), &app.topic_in, 3).await;
    let expected: BTreeSet<String> =
        [&first, &second, &third].iter().map(|answer| answer["key"].as_str().unwrap().to_owned()).collect();
    assert_eq!(keys, expected);
    assert_eq!(message_count(&brokers(), &app.topic_in), 3, "one message per Idempotency-Key");
    // And the letters of exactly those three batches are sent.
    let letters = app.wait_all_final(6, Duration::from_secs(60)).await;
    assert!(letters.iter().all(|l| expected.contains(&l.kafkakey)), "{letters:?}");
}

/// A tansu broker of this test's own, on its own port and sqlite file, to be stopped and started
/// again without touching the shared stack.
struct OwnBroker {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

impl OwnBroker {
    fn binary() -> PathBuf {
        let cache = std::env::var("MAILSENDER_CACHE")
            .unwrap_or_else(|_| format!("{}/.cache/mailsender", std::env::var("HOME").unwrap_or_default()));
        PathBuf::from(cache).join("tansu/bin/tansu")
    }

    async fn start() -> OwnBroker {
        let mut broker = OwnBroker { child: None, port: free_port(), dir: tempfile::tempdir().unwrap() };
        broker.resume().await;
        broker
    }

    fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts the broker (again) on the same port and data.
    async fn resume(&mut self) {
        assert!(self.child.is_none());
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let log = fs::File::options().create(true).append(true).open(self.dir.path().join("tansu.log")).unwrap();
        let child = Command::new(Self::binary())
            .args(["broker", "--storage-engine", "sqlite://tansu.db", "--listener-url", &url])
            .args(["--advertised-listener-url", &url])
            .current_dir(self.dir.path())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", Self::binary().display()));
        self.child = Some(child);
        let port = self.port;
        wait_for("the test's own broker to listen", Duration::from_secs(20), || async move {
            TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ())
        })
        .await;
    }

    /// `kill -SIGNAL` to the broker (`STOP` freezes it with its connections open).
    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("the broker runs").id();
        let status = Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status().unwrap();
        assert!(status.success(), "kill -{signal} {pid}");
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        self.stop();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_503_means_the_batch_is_never_produced() {
    // The old producer held a batch for KAFKA_MESSAGE_TIMEOUT (scaled down here from 60 s) after
    // answering 503 at 10 s; /post's records now time out with its wait.
    const OLD_WINDOW: Duration = Duration::from_secs(20);
    let mut broker = OwnBroker::start().await;
    let sink = SmtpSink::start().await;
    let (brokers, old_window) = (broker.brokers(), format!("{}s", OLD_WINDOW.as_secs()));
    let overrides = [
        ("KAFKA_BROKERS", brokers.as_str()),
        ("KAFKA_MESSAGE_TIMEOUT", old_window.as_str()),
        ("HTTP_POST_TIMEOUT", "3s"),
    ];
    let app = TestApp::spawn(&sink, &overrides).await;
    let body = batch("outage", 1, 1).to_string();
    let (status, before, _) = post(&app, &batch("before", 1, 1).to_string(), None).await;
    assert_eq!(status, 202, "with the broker up: {before}");

    broker.stop();
    let posted = Instant::now();
    let (status, refused, _) = post(&app, &body, Some("outage-1")).await;
    assert_eq!(status, 503, "{refused}");
    broker.resume().await;

    // Past the window in which the old code still produced the refused batch.
    tokio::time::sleep((posted + OLD_WINDOW + Duration::from_secs(3)).saturating_duration_since(Instant::now())).await;
    assert_eq!(
        keys_on(&broker.brokers(), &app.topic_in, 1).await,
        BTreeSet::from([before["key"].as_str().unwrap().to_owned()])
    );
    assert_eq!(message_count(&broker.brokers(), &app.topic_in), 1, "the batch answered 503 was produced");
    assert!(refused["error"].as_str().unwrap().contains("will not be produced"), "{refused}");

    // The failed produce freed its Idempotency-Key: the client's retry goes through, once.
    let (status, retried, _) = post(&app, &body, Some("outage-1")).await;
    assert_eq!(status, 202, "{retried}");
    assert_eq!(message_count(&broker.brokers(), &app.topic_in), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_the_broker_may_have_is_answered_504_not_503() {
    let broker = OwnBroker::start().await;
    let sink = SmtpSink::start().await;
    let brokers = broker.brokers();
    let app = TestApp::spawn(&sink, &[("KAFKA_BROKERS", brokers.as_str()), ("HTTP_POST_TIMEOUT", "3s")]).await;
    let (status, before, _) = post(&app, &batch("before", 1, 1).to_string(), None).await;
    assert_eq!(status, 202, "with the broker up: {before}");

    // A broker that stops answering with the connection open: the request goes out and then
    // times out in flight, so the broker may have the batch. That is not a 503.
    broker.signal("STOP");
    let body = batch("stalled", 1, 1).to_string();
    let (status, unknown, _) = post(&app, &body, Some("stalled-1")).await;
    assert_eq!(status, 504, "{unknown}");
    let key = unknown["key"].as_str().expect("the batch key").to_owned();
    // A repeat is not produced again: the outcome stays unknown, under the same key.
    let (status, again, _) = post(&app, &body, Some("stalled-1")).await;
    assert_eq!((status, again["key"].as_str()), (504, Some(key.as_str())), "{again}");
    broker.signal("CONT");

    // The broker did take it: a 503 here would have invited a duplicate.
    wait_for("the stalled batch on the topic", Duration::from_secs(30), || async {
        (message_count(&brokers, &app.topic_in) >= 2).then_some(())
    })
    .await;
    assert_eq!(
        keys_on(&brokers, &app.topic_in, 2).await,
        BTreeSet::from([before["key"].as_str().unwrap().to_owned(), key])
    );
    assert_eq!(message_count(&brokers, &app.topic_in), 2);
}
