//! Fault-injection helpers for tests/faults.rs, on top of the shared harness in `common`:
//!
//! * [`serial`]: one global async lock, so the disruptive tests of this binary never overlap;
//! * [`Stack`]: stops and restarts one server of the local test stack (tansu or nx-27017) through
//!   `scripts/stack.sh`, found through `MAILSENDER_RUN`, `KAFKA_PORT` and `MONGO_PORT`;
//! * [`ChaosSink`]: an SMTP sink that can be killed and started again on the same port, keeping
//!   what it recorded;
//! * [`Replica`]: another mailsender process built from an environment map (a replica of a
//!   [`TestApp`] with its own `INSTANCE_ID`, HTTP port and SMTP server);
//! * [`Feeder`] and [`read_topic`]: one reusable producer and a tolerant topic reader;
//! * polling helpers that fail with a diagnosis instead of a bare timeout.

#![allow(dead_code)]

use std::{
    collections::{BTreeMap, HashMap},
    fs,
    io::Write,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use mailsender::{
    clock::host_ms,
    model::{Letter, Status},
};
use rdkafka::{
    ClientConfig,
    consumer::{Consumer, StreamConsumer},
    producer::{FutureProducer, FutureRecord},
};
use serde_json::Value;

use crate::common::{
    Consumed, Received, TestApp, brokers, free_port, python, repo_root, unique, wait_for, wait_healthy,
};

// ------------------------------------------------------------------------------------------------
// serialisation
// ------------------------------------------------------------------------------------------------

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Held for the whole of every test in faults.rs: they kill servers the others depend on, and
/// the machine has two cores, so they run one at a time whatever `--test-threads` says.
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    SERIAL.lock().await
}

// ------------------------------------------------------------------------------------------------
// the local stack
// ------------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Server {
    Tansu,
    Nx,
}

impl Server {
    fn name(self) -> &'static str {
        match self {
            Server::Tansu => "tansu",
            Server::Nx => "nx",
        }
    }

    /// What /proc/PID/cmdline must contain, as scripts/stack.sh checks it.
    fn pattern(self) -> &'static str {
        match self {
            Server::Tansu => "tansu",
            Server::Nx => "nx-27017",
        }
    }
}

/// The test stack this process talks to, as scripts/stack.sh manages it.
#[derive(Clone)]
pub struct Stack {
    pub run: PathBuf,
    pub kafka_port: String,
    pub mongo_port: String,
}

fn required_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set. The fault tests restart servers of the local stack, so they need the run dir \
             and ports the stack was started with: run them through scripts/test.sh, or export \
             MAILSENDER_RUN, KAFKA_PORT and MONGO_PORT as given to `scripts/stack.sh up` (and source \
             $MAILSENDER_RUN/stack.env)"
        )
    })
}

impl Stack {
    pub fn from_env() -> Stack {
        let stack = Stack {
            run: PathBuf::from(required_env("MAILSENDER_RUN")),
            kafka_port: required_env("KAFKA_PORT"),
            mongo_port: required_env("MONGO_PORT"),
        };
        assert!(
            brokers().contains(&format!(":{}", stack.kafka_port)),
            "KAFKA_BROKERS={} is not the broker of the stack on KAFKA_PORT={}: restarting it would not affect the tests",
            brokers(),
            stack.kafka_port
        );
        assert!(
            crate::common::mongo_uri().contains(&format!(":{}", stack.mongo_port)),
            "MONGO_LOCAL is not the server of the stack on MONGO_PORT={}",
            stack.mongo_port
        );
        stack
    }

    /// The pid scripts/stack.sh recorded for `server`, if that process still runs.
    pub fn pid(&self, server: Server) -> Option<u32> {
        let text = fs::read_to_string(self.run.join("pids").join(format!("{}.pid", server.name()))).ok()?;
        let pid: u32 = text.trim().parse().ok()?;
        alive(pid).then_some(())?;
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        String::from_utf8_lossy(&cmdline).contains(server.pattern()).then_some(pid)
    }

    /// Stops one server: `signal` to its process group (stack.sh starts each in its own
    /// session), then waits until it is gone. `KILL` is a crash, `TERM` a clean stop.
    pub fn stop(&self, server: Server, signal: &str) {
        let pid = self
            .pid(server)
            .unwrap_or_else(|| panic!("{} is not running (no live pid in {}/pids)", server.name(), self.run.display()));
        let status = Command::new("kill").arg(format!("-{signal}")).arg("--").arg(format!("-{pid}")).status().unwrap();
        assert!(status.success(), "kill -{signal} -{pid} failed");
        let started = Instant::now();
        while alive(pid) {
            if started.elapsed() > Duration::from_secs(10) {
                let _ = Command::new("kill").arg("-KILL").arg("--").arg(format!("-{pid}")).status();
            }
            assert!(started.elapsed() < Duration::from_secs(20), "{} (pid {pid}) did not stop", server.name());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `scripts/stack.sh up --no-maildev`: starts whatever of the stack is not running, on the
    /// same ports and data.
    pub fn up(&self) {
        let output = Command::new("bash")
            .arg(repo_root().join("scripts/stack.sh"))
            .args(["up", "--no-maildev"])
            .env("MAILSENDER_RUN", &self.run)
            .env("KAFKA_PORT", &self.kafka_port)
            .env("MONGO_PORT", &self.mongo_port)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .expect("running scripts/stack.sh up");
        assert!(
            output.status.success(),
            "scripts/stack.sh up failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Brings the stack back when dropped, even if the test panicked with a server down, so
    /// the next test finds it running.
    pub fn guard(&self) -> StackGuard {
        StackGuard { stack: self.clone() }
    }
}

pub struct StackGuard {
    stack: Stack,
}

impl Drop for StackGuard {
    fn drop(&mut self) {
        if self.stack.pid(Server::Tansu).is_none() || self.stack.pid(Server::Nx).is_none() {
            self.stack.up();
        }
    }
}

/// Alive and not a zombie (a killed server is re-parented to init, which reaps it later).
fn alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()) != Some("Z"),
        Err(_) => false,
    }
}

// ------------------------------------------------------------------------------------------------
// an SMTP sink that can die and come back on the same port
// ------------------------------------------------------------------------------------------------

/// scripts/smtp_sink.py, like `common::SmtpSink`, but it can be killed and started again on the
/// same port; every incarnation appends to the same record and reads the same control file.
pub struct ChaosSink {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    runs: usize,
}

impl ChaosSink {
    pub async fn start() -> ChaosSink {
        let mut sink = ChaosSink { port: 0, dir: tempfile::tempdir().unwrap(), child: None, runs: 0 };
        sink.launch().await;
        sink
    }

    async fn launch(&mut self) {
        assert!(self.child.is_none(), "sink already running");
        self.runs += 1;
        let port_file = self.dir.path().join("port");
        let _ = fs::remove_file(&port_file);
        let child = Command::new(python())
            .arg(repo_root().join("scripts/smtp_sink.py"))
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .arg("--port-file")
            .arg(&port_file)
            .arg("--out")
            .arg(self.dir.path().join("mail.jsonl"))
            .arg("--control")
            .arg(self.dir.path().join("control.json"))
            .stdout(Stdio::null())
            .stderr(fs::File::create(self.dir.path().join(format!("sink-{}.log", self.runs))).unwrap())
            .spawn()
            .expect("starting scripts/smtp_sink.py");
        self.child = Some(child);
        let port = wait_for("the SMTP sink to listen", Duration::from_secs(20), || {
            let port_file = port_file.clone();
            async move { fs::read_to_string(&port_file).ok().and_then(|p| p.trim().parse::<u16>().ok()) }
        })
        .await;
        assert!(self.port == 0 || self.port == port, "sink came back on {port}, not {}", self.port);
        self.port = port;
    }

    /// kill -9: connections drop mid-command, new ones are refused.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A new sink process on the same port.
    pub async fn restart(&mut self) {
        self.kill();
        self.launch().await;
    }

    pub fn control(&self, control: Value) {
        let tmp = self.dir.path().join("control.json.tmp");
        fs::write(&tmp, control.to_string()).unwrap();
        fs::rename(tmp, self.dir.path().join("control.json")).unwrap();
    }

    pub fn received(&self) -> Vec<Received> {
        let Ok(text) = fs::read_to_string(self.dir.path().join("mail.jsonl")) else { return Vec::new() };
        // A line the sink is still writing is left for the next read.
        let text = text.rfind('\n').map_or("", |end| &text[..end]);
        text.lines().filter(|l| !l.trim().is_empty()).map(|l| serde_json::from_str(l).expect("sink line")).collect()
    }
}

impl Drop for ChaosSink {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A minimal SMTP server in the test process that, unlike scripts/smtp_sink.py, takes a message
/// as delivered the moment its data ends, and only then waits `delay` before the 250 reply, as a
/// real server that queued the message would. (aiosmtpd cancels its handler, and so forgets the
/// message, when the client disconnects during a delayed reply.) So a send cut short by a kill
/// -9 of the client counts as delivered, and its resend as a duplicate.
pub struct EagerSink {
    pub port: u16,
    received: Arc<Mutex<Vec<Received>>>,
    delay_ms: Arc<AtomicU64>,
    accept: tokio::task::JoinHandle<()>,
}

impl EagerSink {
    pub async fn start(delay: Duration) -> EagerSink {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let received = Arc::new(Mutex::new(Vec::new()));
        let delay_ms = Arc::new(AtomicU64::new(delay.as_millis() as u64));
        let (log, delay) = (received.clone(), delay_ms.clone());
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                tokio::spawn(eager_session(stream, log.clone(), delay.clone()));
            }
        });
        EagerSink { port, received, delay_ms, accept }
    }

    /// The wait before each 250 reply from now on.
    pub fn set_delay(&self, delay: Duration) {
        self.delay_ms.store(delay.as_millis() as u64, Ordering::Relaxed);
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
}

impl Drop for EagerSink {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn eager_session(stream: tokio::net::TcpStream, log: Arc<Mutex<Vec<Received>>>, delay_ms: Arc<AtomicU64>) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let mut line = Vec::new();
    let (mut from, mut rcpts) = (String::new(), Vec::new());
    let address = |line: &str| line.split_once('<').and_then(|(_, r)| r.split_once('>')).map(|(a, _)| a.to_owned());
    if write.write_all(b"220 eager-sink ESMTP\r\n").await.is_err() {
        return;
    }
    loop {
        line.clear();
        match read.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let text = String::from_utf8_lossy(&line).trim_end().to_owned();
        let verb = text.get(..4).unwrap_or_default().to_ascii_uppercase();
        let reply: &[u8] = match verb.as_str() {
            "EHLO" => b"250-eager-sink\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n",
            "HELO" | "NOOP" => b"250 OK\r\n",
            "MAIL" => {
                from = address(&text).unwrap_or_default();
                rcpts.clear();
                b"250 OK\r\n"
            }
            "RCPT" => {
                rcpts.push(address(&text).unwrap_or_default());
                b"250 OK\r\n"
            }
            "RSET" => {
                rcpts.clear();
                b"250 OK\r\n"
            }
            "QUIT" => {
                let _ = write.write_all(b"221 Bye\r\n").await;
                return;
            }
            "DATA" => {
                if write.write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n").await.is_err() {
                    return;
                }
                loop {
                    line.clear();
                    match read.read_until(b'\n', &mut line).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) if line == b".\r\n" => break,
                        Ok(_) => {}
                    }
                }
                let ts = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
                log.lock().unwrap().push(Received {
                    ts,
                    eod_ts: ts,
                    mail_from: from.clone(),
                    rcpt_tos: std::mem::take(&mut rcpts),
                    headers: Vec::new(),
                    raw: String::new(),
                    tls: false,
                    mail_options: Vec::new(),
                    conn: 0,
                    tx: 0,
                    raw_b64: String::new(),
                    max_line: 0,
                });
                tokio::time::sleep(Duration::from_millis(delay_ms.load(Ordering::Relaxed))).await;
                b"250 OK queued\r\n"
            }
            _ => b"502 Command not implemented\r\n",
        };
        if write.write_all(reply).await.is_err() {
            return;
        }
    }
}

/// How often each recipient address reached the SMTP server(s).
pub fn rcpt_counts<'a>(received: impl IntoIterator<Item = &'a Received>) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for message in received {
        for rcpt in &message.rcpt_tos {
            *counts.entry(rcpt.to_lowercase()).or_insert(0) += 1;
        }
    }
    counts
}

// ------------------------------------------------------------------------------------------------
// replicas
// ------------------------------------------------------------------------------------------------

/// One more mailsender process sharing a [`TestApp`]'s topics, database and group.
pub struct Replica {
    pub instance_id: String,
    pub env: HashMap<String, String>,
    pub http: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Replica {
    /// `app`'s configuration with its own instance id, HTTP port and SMTP port.
    pub fn env_from(app: &TestApp, instance_id: &str, smtp_port: u16) -> HashMap<String, String> {
        let mut env = app.env.clone();
        env.insert("INSTANCE_ID".into(), instance_id.into());
        env.insert("HTTP_ADDR".into(), format!("127.0.0.1:{}", free_port()));
        env.insert("SMTP_PORT".into(), smtp_port.to_string());
        if env.contains_key("KAFKA_GROUP_INSTANCE_ID") {
            env.insert("KAFKA_GROUP_INSTANCE_ID".into(), format!("{instance_id}-member"));
        }
        env
    }

    pub async fn start(env: HashMap<String, String>) -> Replica {
        let instance_id = env["INSTANCE_ID"].clone();
        let http = format!("http://{}", env["HTTP_ADDR"]);
        let dir = std::env::temp_dir().join("mailsender-test-logs");
        fs::create_dir_all(&dir).unwrap();
        let log = dir.join(format!("{instance_id}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_mailsender"))
            .env_clear()
            .envs(&env)
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .stdout(fs::File::create(&log).unwrap())
            .stderr(fs::File::options().append(true).open(&log).unwrap())
            .spawn()
            .unwrap();
        let mut replica = Replica { instance_id, env, http, child: Some(child), log };
        wait_healthy(&replica.http, replica.child.as_mut().unwrap(), &replica.log).await;
        replica
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

// ------------------------------------------------------------------------------------------------
// Kafka
// ------------------------------------------------------------------------------------------------

/// One producer for many messages (the harness's `produce` makes a client per message).
pub struct Feeder {
    producer: FutureProducer,
}

impl Feeder {
    pub fn new() -> Feeder {
        let producer = ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .set("message.timeout.ms", "30000")
            .set("message.max.bytes", "2097152")
            .create()
            .unwrap();
        Feeder { producer }
    }

    /// Produces one message and waits for the broker's acknowledgement. `payload: None` sends
    /// a message without a value.
    pub async fn send(&self, topic: &str, partition: Option<i32>, key: Option<&[u8]>, payload: Option<&[u8]>) {
        let mut record = FutureRecord::<[u8], [u8]>::to(topic);
        if let Some(partition) = partition {
            record = record.partition(partition);
        }
        if let Some(key) = key {
            record = record.key(key);
        }
        if let Some(payload) = payload {
            record = record.payload(payload);
        }
        self.producer.send(record, Duration::from_secs(30)).await.map_err(|(e, _)| e).expect("producing");
    }
}

/// Reads `topic` from the beginning with a fresh group until `done` says so or `timeout`
/// passes; returns what it read either way, for the caller to judge.
pub async fn read_topic(topic: &str, timeout: Duration, mut done: impl FnMut(&[Consumed]) -> bool) -> Vec<Consumed> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", unique("faults-reader-"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("fetch.max.bytes", "4194304")
        .set("max.partition.fetch.bytes", "2097152")
        .set("receive.message.max.bytes", "5000000")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut out: Vec<Consumed> = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    while !done(&out) {
        let message = match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Ok(Ok(message)) => message,
            Ok(Err(error)) => {
                eprintln!("reading {topic}: {error}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            Err(_) => break,
        };
        out.push(Consumed::from_message(&message));
    }
    out
}

// ------------------------------------------------------------------------------------------------
// letters
// ------------------------------------------------------------------------------------------------

/// Letters per status, e.g. `{awaiting: 3, sent: 97}`.
pub fn tally(letters: &[Letter]) -> BTreeMap<&'static str, usize> {
    let mut counts = BTreeMap::new();
    for letter in letters {
        *counts.entry(letter.status.as_str()).or_insert(0) += 1;
    }
    counts
}

pub fn is_final(letter: &Letter) -> bool {
    matches!(letter.status, Status::Sent | Status::Error)
}

/// What unfinished letters look like, for failure messages: who holds them and until when.
pub fn diagnose(letters: &[Letter]) -> String {
    let now = host_ms();
    let mut holders: BTreeMap<String, (usize, i64, i64)> = BTreeMap::new();
    for letter in letters.iter().filter(|l| l.status == Status::Processing) {
        let owner = letter.owner.clone().unwrap_or_else(|| "<none>".into());
        let lease_left = letter.lease_ms.unwrap_or_default() - now;
        let entry = holders.entry(owner).or_insert((0, i64::MAX, i64::MIN));
        entry.0 += 1;
        entry.1 = entry.1.min(lease_left);
        entry.2 = entry.2.max(lease_left);
    }
    let mut text = format!("{} letters: {:?}", letters.len(), tally(letters));
    for (owner, (count, min_left, max_left)) in holders {
        text.push_str(&format!(
            "\n  {count} processing, owner {owner}, lease ends in {min_left}..{max_left} ms (negative: expired)"
        ));
    }
    for letter in letters.iter().filter(|l| l.status == Status::Awaiting).take(3) {
        text.push_str(&format!(
            "\n  awaiting {} attempts {} due in {} ms, error {:?}",
            letter.id,
            letter.attempts,
            letter.due_ms - now,
            letter.error
        ));
    }
    text
}

/// Waits until `count` letters exist and all are final. Fails early, with a diagnosis, when
/// nothing has progressed for `stall` (e.g. letters stuck in `processing` under leases that
/// keep being renewed), and at the latest after `timeout`.
pub async fn wait_all_final(app: &TestApp, count: usize, stall: Duration, timeout: Duration) -> Vec<Letter> {
    try_wait_all_final(app, count, stall, timeout).await.unwrap_or_else(|failure| panic!("{failure}"))
}

/// [`wait_all_final`], returning the diagnosis instead of panicking.
pub async fn try_wait_all_final(
    app: &TestApp,
    count: usize,
    stall: Duration,
    timeout: Duration,
) -> Result<Vec<Letter>, String> {
    let started = Instant::now();
    let mut last_progress = Instant::now();
    let mut last_final = usize::MAX;
    loop {
        let letters = app.letters().await;
        let finals = letters.iter().filter(|l| is_final(l)).count();
        if letters.len() == count && finals == count {
            return Ok(letters);
        }
        if finals != last_final {
            last_final = finals;
            last_progress = Instant::now();
        }
        if last_progress.elapsed() >= stall || started.elapsed() >= timeout {
            return Err(format!(
                "{} of {count} letters final and no progress for {:?} (after {:?} in all): {}",
                finals,
                last_progress.elapsed(),
                started.elapsed(),
                diagnose(&letters)
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

// ------------------------------------------------------------------------------------------------
// figures
// ------------------------------------------------------------------------------------------------

/// Marks `test` as started in target/faults-report.txt, so figures of an earlier run never pass
/// for this run's when it fails before reporting.
pub fn report_start(test: &str) {
    let at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
    write_report(test, &[format!("run started at unix time {at} did not finish; see the test output")]);
}

/// Prints `lines` and stores them in target/faults-report.txt under `test`, replacing that
/// test's lines from an earlier run.
pub fn report(test: &str, lines: &[String]) {
    for line in lines {
        println!("[{test}] {line}");
    }
    write_report(test, lines);
}

fn write_report(test: &str, lines: &[String]) {
    let prefix = format!("[{test}]");
    let path = repo_root().join("target/faults-report.txt");
    let old = fs::read_to_string(&path).unwrap_or_default();
    let mut text: String = old.lines().filter(|l| !l.starts_with(&prefix)).map(|l| format!("{l}\n")).collect();
    for line in lines.iter().flat_map(|l| l.lines()) {
        text.push_str(&format!("{prefix} {line}\n"));
    }
    let _ = fs::create_dir_all(repo_root().join("target"));
    if let Ok(mut file) = fs::File::create(&path) {
        let _ = file.write_all(text.as_bytes());
    }
}
