//! Test harness: runs the real `mailsender` binary against the local stack's broker and
//! Mongo-wire server, each test with its own topics, database, consumer group, HTTP port and
//! SMTP sink, and waits on observable outcomes with timeouts.
//!
//! Needs `KAFKA_BROKERS` and `MONGO_LOCAL` pointing at a running stack: `scripts/test.sh` starts
//! one and sets them.

#![allow(dead_code)]

use std::{
    collections::HashMap,
    fs,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use mailsender::model::{Letter, Status};
use mongodb::bson::{Document, doc};
use rdkafka::{
    ClientConfig, Message,
    consumer::{Consumer, StreamConsumer},
    message::Headers,
    producer::{FutureProducer, FutureRecord},
};
use serde_json::Value;

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn stack_var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the tests through scripts/test.sh, which starts the local stack")
    })
}

pub fn brokers() -> String {
    stack_var("KAFKA_BROKERS")
}

pub fn mongo_uri() -> String {
    stack_var("MONGO_LOCAL")
}

pub fn python() -> String {
    std::env::var("MAILSENDER_PYTHON").unwrap_or_else(|_| {
        let cache = std::env::var("MAILSENDER_CACHE")
            .unwrap_or_else(|_| format!("{}/.cache/mailsender", std::env::var("HOME").unwrap_or_default()));
        format!("{cache}/venv/bin/python")
    })
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}{}", &uuid::Uuid::new_v4().simple().to_string()[..10])
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The value of the sample `name` (with its labels, if any) in a `/metrics` text.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The HTTPS link of a message's List-Unsubscribe header (unfolded).
pub fn https_link(received: &Received) -> String {
    let header = received.header("List-Unsubscribe").expect("a List-Unsubscribe header").replace(['\r', '\n'], "");
    header
        .split(',')
        .map(|t| t.trim().trim_start_matches('<').trim_end_matches('>'))
        .find(|t| t.starts_with("https://"))
        .expect("an https link")
        .to_owned()
}

/// Polls `check` until it returns `Some`, or panics with `what` after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One message as the SMTP sink recorded it.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct Received {
    pub ts: f64,
    /// When the data ended (the final "."), before any `data_delay_s`: when a relay counts it.
    #[serde(default)]
    pub eod_ts: f64,
    pub mail_from: String,
    pub rcpt_tos: Vec<String>,
    pub headers: Vec<(String, String)>,
    pub raw: String,
    #[serde(default)]
    pub tls: bool,
    #[serde(default)]
    pub mail_options: Vec<String>,
    /// Connection number and transaction number within it, from 1.
    #[serde(default)]
    pub conn: u64,
    #[serde(default)]
    pub tx: u64,
    /// The exact bytes received (after dot-unstuffing), base64.
    #[serde(default)]
    pub raw_b64: String,
    /// The longest line of the message as received, in octets without CRLF.
    #[serde(default)]
    pub max_line: usize,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn bytes(&self) -> Vec<u8> {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.decode(&self.raw_b64).expect("raw_b64 is base64")
    }
}

/// One line of the sink's wire transcript.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct WireLine {
    pub ts: f64,
    pub conn: u64,
    /// "c" from the client, "s" from the server.
    pub dir: String,
    pub line: String,
}

/// How a test SMTP server is started.
pub struct SinkOptions {
    pub tls: SinkTls,
    pub pipelining: bool,
    pub extra_args: Vec<String>,
}

impl Default for SinkOptions {
    fn default() -> Self {
        SinkOptions { tls: SinkTls::None, pipelining: true, extra_args: Vec::new() }
    }
}

pub enum SinkTls {
    None,
    StartTls,
    Implicit,
}

/// An SMTP server that records what it receives (scripts/smtp_sink.py), one per test.
pub struct SmtpSink {
    child: Child,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl SmtpSink {
    pub async fn start() -> SmtpSink {
        Self::start_with(SinkTls::None).await
    }

    pub async fn start_with(tls: SinkTls) -> SmtpSink {
        Self::start_options(SinkOptions { tls, ..Default::default() }).await
    }

    /// A sink that does not advertise PIPELINING, so clients talk in lock-step.
    pub async fn start_lockstep() -> SmtpSink {
        Self::start_options(SinkOptions { pipelining: false, ..Default::default() }).await
    }

    pub async fn start_options(options: SinkOptions) -> SmtpSink {
        let SinkOptions { tls, pipelining, extra_args } = options;
        let dir = tempfile::tempdir().unwrap();
        let port_file = dir.path().join("port");
        let mut command = Command::new(python());
        command
            .arg(repo_root().join("scripts/smtp_sink.py"))
            .args(["--host", "127.0.0.1", "--port", "0"])
            .arg("--port-file")
            .arg(&port_file)
            .arg("--out")
            .arg(dir.path().join("mail.jsonl"))
            .arg("--control")
            .arg(dir.path().join("control.json"))
            .arg("--transcript")
            .arg(dir.path().join("transcript.jsonl"))
            .args(&extra_args)
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.path().join("sink.log")).unwrap());
        if !pipelining {
            command.arg("--no-pipelining");
        }
        let mode = match tls {
            SinkTls::None => None,
            SinkTls::StartTls => Some("starttls"),
            SinkTls::Implicit => Some("implicit"),
        };
        if let Some(mode) = mode {
            let certs = test_certs();
            command.arg("--tls-cert").arg(certs.join("cert.pem")).arg("--tls-key").arg(certs.join("key.pem"));
            command.args(["--tls-mode", mode]);
        }
        let child = command.spawn().expect("starting scripts/smtp_sink.py (is the stack installed?)");
        let port = wait_for("the SMTP sink to listen", Duration::from_secs(20), || {
            let port_file = port_file.clone();
            async move { fs::read_to_string(&port_file).ok().and_then(|p| p.trim().parse::<u16>().ok()) }
        })
        .await;
        SmtpSink { child, port, dir }
    }

    /// Changes the sink's behaviour (see scripts/smtp_sink.py for the keys).
    pub fn control(&self, control: Value) {
        let path = self.dir.path().join("control.json");
        let tmp = self.dir.path().join("control.json.tmp");
        fs::write(&tmp, control.to_string()).unwrap();
        fs::rename(tmp, path).unwrap();
    }

    pub fn received(&self) -> Vec<Received> {
        let Ok(text) = fs::read_to_string(self.dir.path().join("mail.jsonl")) else { return Vec::new() };
        // The sink may be writing a line right now: only complete lines count.
        let text = text.rfind('\n').map_or("", |end| &text[..end]);
        text.lines().filter(|l| !l.trim().is_empty()).map(|l| serde_json::from_str(l).expect("sink line")).collect()
    }

    /// Every line that crossed the wire, in order.
    pub fn transcript(&self) -> Vec<WireLine> {
        let Ok(text) = fs::read_to_string(self.dir.path().join("transcript.jsonl")) else { return Vec::new() };
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).expect("transcript line"))
            .collect()
    }

    /// The commands the client sent (verb and arguments), in order.
    pub fn client_lines(&self) -> Vec<String> {
        self.transcript().into_iter().filter(|l| l.dir == "c").map(|l| l.line).collect()
    }

    pub async fn wait_for_count(&self, count: usize, timeout: Duration) -> Vec<Received> {
        wait_for(&format!("{count} messages at the SMTP sink"), timeout, || async {
            let received = self.received();
            (received.len() >= count).then_some(received)
        })
        .await
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A CA and a `localhost` certificate, made once by scripts/gen-test-cert.sh.
pub fn test_certs() -> PathBuf {
    let dir = std::env::temp_dir().join("mailsender-test-certs");
    if !dir.join("cert.pem").exists() {
        let status = Command::new("bash").arg(repo_root().join("scripts/gen-test-cert.sh")).arg(&dir).status().unwrap();
        assert!(status.success(), "scripts/gen-test-cert.sh failed");
    }
    dir
}

/// Waits until the process started at `http` answers `/health`; panics with its log if it exits
/// or stays unhealthy for a minute.
pub async fn wait_healthy(http: &str, child: &mut Child, log: &Path) {
    let url = format!("{http}/health");
    let started = Instant::now();
    loop {
        if let Ok(response) = reqwest::get(&url).await
            && response.status().is_success()
        {
            return;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "mailsender exited during start-up with {status}; log: {}\n{}",
                log.display(),
                fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "mailsender did not become healthy; log: {}",
            log.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A running mailsender process with its own topics, database and group.
pub struct TestApp {
    pub name: String,
    pub env: HashMap<String, String>,
    pub http: String,
    pub topic_in: String,
    pub topic_out: String,
    pub topic_dlq: String,
    pub database: String,
    child: Option<Child>,
    log_dir: PathBuf,
    runs: usize,
    mongo: mongodb::Client,
}

impl TestApp {
    /// Starts the service against `sink` with fast test settings; `overrides` win.
    pub async fn spawn(sink: &SmtpSink, overrides: &[(&str, &str)]) -> TestApp {
        let name = unique("t");
        let port = free_port();
        let mut env: HashMap<String, String> = [
            ("KAFKA_BROKERS", brokers()),
            ("KAFKA_TOPIC_MAILSENDER", format!("{name}-in")),
            ("KAFKA_TOPIC_PROFILE", format!("{name}-out")),
            ("KAFKA_TOPIC_DLQ", format!("{name}-in.dlq")),
            ("KAFKA_GROUPID", format!("{name}-group")),
            ("KAFKA_TOPIC_PARTITIONS", "2".into()),
            ("MONGO_LOCAL", mongo_uri()),
            ("MONGODB_BASE_NAME", format!("{name}_db")),
            ("SMTP_HOST", "127.0.0.1".into()),
            ("SMTP_PORT", sink.port.to_string()),
            ("SMTP_TLS", "none".into()),
            ("SMTP_FROM", "Mailsender Test <noreply@mailsender.test>".into()),
            ("SMTP_MAX_SENDERS", "4".into()),
            ("SMTP_RATE_LIMIT_PERIOD", "1s".into()),
            ("SMTP_RATE_LIMIT_MAX_LETTERS", "1000".into()),
            ("SMTP_TIMEOUT", "10s".into()),
            ("RETRY_BACKOFF_BASE", "500ms".into()),
            ("RETRY_BACKOFF_MAX", "2s".into()),
            ("LEASE_DURATION", "6s".into()),
            ("DISPATCH_POLL_INTERVAL", "300ms".into()),
            ("SHUTDOWN_TIMEOUT", "15s".into()),
            ("HTTP_ADDR", format!("127.0.0.1:{port}")),
            ("INSTANCE_ID", format!("{name}-a")),
            ("RUST_LOG", "info,mailsender=debug".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        for (key, value) in overrides {
            env.insert((*key).to_owned(), (*value).to_owned());
        }
        let mongo = mongodb::Client::with_uri_str(mongo_uri()).await.unwrap();
        let log_dir = std::env::temp_dir().join("mailsender-test-logs");
        fs::create_dir_all(&log_dir).unwrap();
        let mut app = TestApp {
            http: format!("http://127.0.0.1:{port}"),
            topic_in: env["KAFKA_TOPIC_MAILSENDER"].clone(),
            topic_out: env["KAFKA_TOPIC_PROFILE"].clone(),
            topic_dlq: env["KAFKA_TOPIC_DLQ"].clone(),
            database: env["MONGODB_BASE_NAME"].clone(),
            name,
            env,
            child: None,
            log_dir,
            runs: 0,
            mongo,
        };
        app.start().await;
        app
    }

    /// Starts (or restarts) the process with the same configuration.
    pub async fn start(&mut self) {
        assert!(self.child.is_none(), "already running");
        self.runs += 1;
        let log = self.log_path();
        let child = Command::new(env!("CARGO_BIN_EXE_mailsender"))
            .env_clear()
            .envs(&self.env)
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .stdout(fs::File::create(&log).unwrap())
            .stderr(fs::File::options().append(true).open(&log).unwrap())
            .spawn()
            .unwrap();
        self.child = Some(child);
        wait_healthy(&self.http, self.child.as_mut().unwrap(), &log).await;
    }

    pub fn log_path(&self) -> PathBuf {
        self.log_dir.join(format!("{}-{}.log", self.name, self.runs))
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub async fn post(&self, path: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
        let response = reqwest::Client::new()
            .post(format!("{}{path}", self.http))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        let response = reqwest::get(format!("{}{path}", self.http)).await.unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    }

    /// Waits for the process to exit by itself.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.as_mut().expect("not running").try_wait().unwrap() {
                self.child = None;
                return status;
            }
            assert!(started.elapsed() < timeout, "mailsender did not exit within {timeout:?}; log:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// kill -9: no shutdown code runs.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn letters_collection(&self) -> mongodb::Collection<Letter> {
        self.mongo.database(&self.database).collection("letters")
    }

    pub async fn letters(&self) -> Vec<Letter> {
        use futures::TryStreamExt;
        self.letters_collection().find(doc! {}).await.unwrap().try_collect().await.unwrap()
    }

    pub async fn raw_letters(&self) -> Vec<Document> {
        self.raw_documents("letters").await
    }

    /// Every document of one collection of this app's database.
    pub async fn raw_documents(&self, collection: &str) -> Vec<Document> {
        use futures::TryStreamExt;
        self.mongo
            .database(&self.database)
            .collection::<Document>(collection)
            .find(doc! {})
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap()
    }

    /// Writes documents straight into the letters collection, as another writer (the Go
    /// service, an older version, a hand edit) would.
    pub async fn insert_raw(&self, documents: Vec<Document>) {
        self.mongo.database(&self.database).collection::<Document>("letters").insert_many(documents).await.unwrap();
    }

    /// Changes stored letters behind the service's back (as another replica would).
    pub async fn update_raw(&self, filter: Document, update: Document) -> u64 {
        let letters = self.mongo.database(&self.database).collection::<Document>("letters");
        letters.update_many(filter, update).await.unwrap().modified_count
    }

    pub async fn wait_for_letters(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&[Letter]) -> bool,
    ) -> Vec<Letter> {
        wait_for(what, timeout, || async {
            let letters = self.letters().await;
            done(&letters).then_some(letters)
        })
        .await
    }

    pub async fn wait_all_final(&self, count: usize, timeout: Duration) -> Vec<Letter> {
        self.wait_for_letters(&format!("{count} letters in a final status"), timeout, |letters| {
            letters.len() == count && letters.iter().all(|l| matches!(l.status, Status::Sent | Status::Error))
        })
        .await
    }

    pub async fn produce(&self, key: Option<&str>, payload: &[u8]) {
        produce(&self.topic_in, key, payload).await;
    }

    /// Reads `count` messages from `topic` from the beginning (fresh group), or panics.
    pub async fn consume(&self, topic: &str, count: usize, timeout: Duration) -> Vec<Consumed> {
        consume(topic, count, timeout).await
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.kill();
        // A test that fails on CI leaves only its output behind: the process's own account of
        // what it did goes with the panic, or a timeout there cannot be told from another.
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
            eprintln!("--- the last {} lines of {} ---", tail.len(), self.log_path().display());
            for line in tail {
                eprintln!("{line}");
            }
        }
    }
}

/// How much of a failed test's process log goes with its failure.
const LOG_TAIL_LINES: usize = 80;

pub async fn produce(topic: &str, key: Option<&str>, payload: &[u8]) {
    produce_bytes(topic, key.map(str::as_bytes), payload).await;
}

/// Produces one gzip-compressed message: a broker that takes a few MB on the wire can carry a
/// payload many times larger.
pub async fn produce_compressed(topic: &str, key: &str, payload: &[u8]) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("message.timeout.ms", "20000")
        .set("message.max.bytes", "67108864")
        .set("compression.type", "gzip")
        .create()
        .unwrap();
    let record = FutureRecord::<str, [u8]>::to(topic).key(key).payload(payload);
    producer.send(record, Duration::from_secs(20)).await.map_err(|(e, _)| e).expect("producing to the test topic");
}

/// Creates topics, for a test that keeps the service from creating its own.
pub async fn create_topics(topics: &[&str], partitions: i32) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<_> = ClientConfig::new().set("bootstrap.servers", brokers()).create().unwrap();
    let new: Vec<NewTopic<'_>> =
        topics.iter().map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(1))).collect();
    for result in admin.create_topics(&new, &AdminOptions::new()).await.unwrap() {
        result.expect("creating a test topic");
    }
}

/// Produces with any key bytes, or none at all.
pub async fn produce_bytes(topic: &str, key: Option<&[u8]>, payload: &[u8]) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("message.timeout.ms", "20000")
        .set("message.max.bytes", "16777216")
        .create()
        .unwrap();
    let mut record = FutureRecord::<[u8], [u8]>::to(topic).payload(payload);
    if let Some(key) = key {
        record = record.key(key);
    }
    producer.send(record, Duration::from_secs(20)).await.map_err(|(e, _)| e).expect("producing to the test topic");
}

#[derive(Debug, Clone)]
pub struct Consumed {
    pub key: Option<String>,
    pub key_bytes: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: HashMap<String, String>,
    pub partition: i32,
    pub offset: i64,
}

impl Consumed {
    pub fn from_message(message: &rdkafka::message::BorrowedMessage<'_>) -> Consumed {
        let headers = message
            .headers()
            .map(|h| {
                h.iter()
                    .map(|header| {
                        (header.key.to_owned(), String::from_utf8_lossy(header.value.unwrap_or_default()).into_owned())
                    })
                    .collect()
            })
            .unwrap_or_default();
        Consumed {
            key: message.key().map(|k| String::from_utf8_lossy(k).into_owned()),
            key_bytes: message.key().map(<[u8]>::to_vec),
            payload: message.payload().unwrap_or_default().to_vec(),
            headers,
            partition: message.partition(),
            offset: message.offset(),
        }
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.payload).expect("JSON status message")
    }
}

pub async fn consume(topic: &str, count: usize, timeout: Duration) -> Vec<Consumed> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", unique("reader-"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    while out.len() < count {
        let message = match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Ok(Ok(message)) => message,
            Ok(Err(error)) => panic!("consuming {topic}: {error}"),
            Err(_) => panic!("timed out after {timeout:?} with {} of {count} messages on {topic}", out.len()),
        };
        out.push(Consumed::from_message(&message));
    }
    out
}

/// Every address of a batch, lower-cased.
pub fn addresses_of(batch: &Value) -> Vec<String> {
    batch
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|m| m["Addresses"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_lowercase()))
        .collect()
}

/// A batch of `count` mailings, `per_letter` addresses each, all distinct.
pub fn batch(tag: &str, count: usize, per_letter: usize) -> Value {
    Value::Array(
        (0..count)
            .map(|i| {
                serde_json::json!({
                    "Subject": format!("{tag} letter {i}"),
                    "Body": format!("<p>Hello from {tag}, letter {i}</p>"),
                    "Addresses": (0..per_letter).map(|j| format!("{tag}-{i}-{j}@example.org")).collect::<Vec<_>>(),
                    "Token": format!("token-{tag}-{i}"),
                })
            })
            .collect(),
    )
}

pub fn path_exists(path: &Path) -> bool {
    path.exists()
}

/// Suppression entries as (address key, reason), sorted: what a test compares them by.
pub fn suppressed(entries: &[mongodb::bson::Document]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = entries
        .iter()
        .map(|d| (d.get_str("_id").unwrap().to_owned(), d.get_str("reason").unwrap().to_owned()))
        .collect();
    out.sort();
    out
}

/// A TCP proxy that delays every byte by `one_way` in each direction, as a network between
/// regions does: a real server made far away. Order is kept; a side that closes closes the other.
pub struct DelayProxy {
    pub port: u16,
    accept: tokio::task::JoinHandle<()>,
}

impl DelayProxy {
    pub async fn start(upstream: &str, one_way: Duration) -> DelayProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let upstream = upstream.to_owned();
        let accept = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(&upstream).await else { return };
                    let _ = (inbound.set_nodelay(true), outbound.set_nodelay(true));
                    let (from_client, to_client) = inbound.into_split();
                    let (from_server, to_server) = outbound.into_split();
                    tokio::join!(delayed(from_client, to_server, one_way), delayed(from_server, to_client, one_way));
                });
            }
        });
        DelayProxy { port, accept }
    }

    /// `uri` (a `mongodb://host:port/...` URI) with its address replaced by this proxy's.
    pub fn mongodb_uri(&self, uri: &str) -> String {
        uri.replacen(&mongodb_address(uri), &format!("127.0.0.1:{}", self.port), 1)
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Copies `from` to `to`, each read written `delay` after it arrived.
async fn delayed(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf, delay: Duration) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let writer = async move {
        while let Some((due, bytes)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&bytes).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    let reader = async move {
        let mut buffer = vec![0; 64 * 1024];
        while let Ok(n @ 1..) = from.read(&mut buffer).await {
            if tx.send((tokio::time::Instant::now() + delay, buffer[..n].to_vec())).is_err() {
                return;
            }
        }
    };
    tokio::join!(reader, writer);
}

/// The `host:port` of a `mongodb://` URI.
pub fn mongodb_address(uri: &str) -> String {
    let rest = uri.strip_prefix("mongodb://").expect("a mongodb:// URI");
    rest[..rest.find(['/', '?']).unwrap_or(rest.len())].to_owned()
}
