//! The inbound SMTP listener for DSNs and ARF reports (`FEEDBACK_SMTP_ADDR`, off by default),
//! fit to sit behind the bounce domain's MX. It takes mail only for signed return paths
//! ([`ReturnPath::verify`]) and the feedback-loop address (`FEEDBACK_LOOP_ADDRESS`), refuses
//! every other recipient with 550 (so it can never relay), bounds each message
//! (`FEEDBACK_MAX_BYTES`: advertised as SIZE, refused at MAIL when declared larger, cut off with
//! 552 when the data runs past it) and answers 250 only once the report is recorded: its events
//! stored and published, or the message kept unparsed. A failure to record answers 451, and the
//! sending MTA retries.
//!
//! Connections are served in parallel, each in its task, and nothing holds one back for
//! another: the memory the messages take is bounded in bytes ([`DATA_BUDGET_MESSAGES`] messages
//! of `FEEDBACK_MAX_BYTES`, charged as their data arrives), not by a number of DATA phases, so
//! many small reports are read at once and a slow sender holds only what it sent. The reports
//! of concurrent connections are recorded together ([`Recorder`]): a batch costs the round
//! trips of one report.
//!
//! Written by hand, as a small RFC 5321 server loop over tokio: the Rust SMTP server crates we
//! looked at either run their own threads and I/O (mailin-embedded) or are unmaintained
//! (samotop), and the subset needed here is small: no AUTH (nobody logs in to an MX), no
//! relaying, one policy decision at RCPT and one after the data. STARTTLS is not offered yet;
//! DSNs carry no secret, and MTAs deliver to an MX without it.

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use mongodb::bson::oid::ObjectId;
use tokio::{
    io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};
use tokio_util::sync::CancellationToken;

use super::{Feedback, Recorder, TryLater, return_path::ReturnPath};

/// Connections served at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 64;
/// RFC 5321 §4.5.3.1.4: a command line is at most 512 octets; a little slack for extensions.
const MAX_COMMAND: usize = 1024;
/// RFC 5321 §4.5.3.1.6: a text line is at most 1000 octets; this leaves room for sloppy senders.
const MAX_LINE: usize = 64 * 1024;
/// What the messages held at once may weigh, in messages of `FEEDBACK_MAX_BYTES` (each with a
/// copy or two while it is parsed and kept): what bounds the listener's memory, whatever the
/// number of connections. Charged by the KiB as the data arrives, so a DSN of a few KiB takes
/// its few KiB. A message that finds the budget spent is read to its end and answered 452, and
/// its MTA delivers it again later; nobody waits on another connection for their 354.
const DATA_BUDGET_MESSAGES: usize = 2;
/// The unit in which [`Inbound::memory`] is counted.
const KIB: usize = 1024;
/// Recipients in one transaction: a DSN goes to one return path.
const MAX_RECIPIENTS: usize = 100;
/// RFC 5321 §4.5.3.2.7: the server waits 5 minutes for the next command.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);
/// The whole DATA phase, a bound on a slow sender of a large message.
const DATA_TIMEOUT: Duration = Duration::from_secs(600);

pub struct Inbound {
    pub recorder: Recorder,
    pub return_paths: ReturnPath,
    /// Lower-case.
    pub loop_address: Option<String>,
    pub max_bytes: usize,
    /// The name in the banner and the EHLO reply.
    pub hostname: String,
    /// The KiB the messages being read or recorded may take; see [`DATA_BUDGET_MESSAGES`].
    pub memory: Semaphore,
}

impl Inbound {
    pub fn new(
        feedback: Arc<Feedback>,
        return_paths: ReturnPath,
        loop_address: Option<String>,
        max_bytes: usize,
        hostname: String,
    ) -> Inbound {
        let budget_kib = (max_bytes.div_ceil(KIB) * DATA_BUDGET_MESSAGES).clamp(1, Semaphore::MAX_PERMITS);
        Inbound {
            recorder: Recorder::start(feedback),
            return_paths,
            loop_address,
            max_bytes,
            hostname,
            memory: Semaphore::new(budget_kib),
        }
    }
}

/// What the DATA phase gave.
enum Data {
    Message(Vec<u8>),
    TooLarge,
    LineTooLong,
    /// The memory budget was spent by other messages: try again later.
    Busy,
}

/// A recipient the listener takes mail for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Letter(ObjectId),
    Loop,
}

/// Binds `FEEDBACK_SMTP_ADDR` when it is set, at start-up, so a port in use stops the start.
pub async fn bind(config: &crate::config::FeedbackConfig) -> anyhow::Result<Option<TcpListener>> {
    let Some(addr) = config.smtp_addr else { return Ok(None) };
    let listener = TcpListener::bind(addr).await.with_context(|| format!("binding FEEDBACK_SMTP_ADDR {addr}"))?;
    Ok(Some(listener))
}

/// Starts serving a bound listener until `shutdown`; `None` when the return paths are not
/// configured (the configuration refuses that, so only a test can get here).
pub fn start(
    listener: TcpListener,
    config: &crate::config::Config,
    store: &crate::store::Store,
    suppressions: crate::deliverability::suppression::Suppressions,
    producer: crate::kafka::StatusProducer,
    metrics: Arc<crate::metrics::Metrics>,
    shutdown: CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    let return_paths = ReturnPath::from_config(&config.feedback)?;
    let publish_lease = config.kafka.message_timeout + Duration::from_secs(10);
    let feedback = Feedback {
        store: store.feedback(publish_lease),
        suppressions,
        producer,
        topic: config.feedback.topic.clone(),
        metrics,
    };
    let inbound = Inbound::new(
        Arc::new(feedback),
        return_paths,
        config.feedback.loop_address.clone(),
        config.feedback.max_bytes,
        config.smtp.helo_name.clone(),
    );
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(addr = %addr, max_bytes = inbound.max_bytes, "feedback SMTP listener listening");
    }
    Some(tokio::spawn(serve(listener, Arc::new(inbound), shutdown)))
}

/// Accepts connections until `shutdown`; each is served in a task of its own.
pub async fn serve(listener: TcpListener, inbound: Arc<Inbound>, shutdown: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            permit = slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let inbound = inbound.clone();
                let shutdown = shutdown.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    if let Err(error) = session(stream, &inbound, shutdown).await {
                        tracing::debug!(peer = %peer, error = %error, "feedback SMTP session ended");
                    }
                });
            }
            Err(error) => {
                // A full file table or similar: wait, as the next accept would fail at once too.
                tracing::warn!(error = %error, "feedback listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    tracing::info!("feedback listener stopped");
}

async fn session(stream: TcpStream, inbound: &Inbound, shutdown: CancellationToken) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    let (read, write) = stream.into_split();
    Session { reader: BufReader::new(read), writer: write, inbound }.run(shutdown).await
}

struct Session<'a, R, W> {
    reader: BufReader<R>,
    writer: W,
    inbound: &'a Inbound,
}

/// What reading a line gave.
enum Line {
    Text(Vec<u8>),
    /// Longer than allowed; the rest of it was read and dropped.
    TooLong,
    Closed,
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Session<'_, R, W> {
    async fn run(mut self, shutdown: CancellationToken) -> std::io::Result<()> {
        self.reply(&format!("220 {} ESMTP mailsender feedback", self.inbound.hostname)).await?;
        let mut mail = false;
        let mut targets: Vec<(String, Target)> = Vec::new();
        loop {
            let line = tokio::select! {
                _ = shutdown.cancelled() => {
                    return self.reply("421 4.3.2 Shutting down, try again later").await;
                }
                line = tokio::time::timeout(COMMAND_TIMEOUT, self.line(MAX_COMMAND)) => match line {
                    Ok(line) => line?,
                    Err(_) => return self.reply("421 4.4.2 Timeout waiting for a command").await,
                },
            };
            let line = match line {
                Line::Text(line) => line,
                Line::TooLong => {
                    self.reply("500 5.5.2 Line too long").await?;
                    continue;
                }
                Line::Closed => return Ok(()),
            };
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\r', '\n']);
            let (verb, rest) = line.split_once(' ').unwrap_or((line, ""));
            match verb.to_ascii_uppercase().as_str() {
                "EHLO" => {
                    (mail, targets) = (false, Vec::new());
                    let reply = format!(
                        "250-{}\r\n250-SIZE {}\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250 SMTPUTF8",
                        self.inbound.hostname, self.inbound.max_bytes
                    );
                    self.reply(&reply).await?;
                }
                "HELO" => {
                    (mail, targets) = (false, Vec::new());
                    self.reply(&format!("250 {}", self.inbound.hostname)).await?;
                }
                "MAIL" => {
                    if mail {
                        self.reply("503 5.5.1 Nested MAIL command").await?;
                    } else if !rest.to_ascii_uppercase().starts_with("FROM:") {
                        self.reply("501 5.5.4 Syntax: MAIL FROM:<address>").await?;
                    } else if declared_size(rest).is_some_and(|size| size > self.inbound.max_bytes) {
                        self.reply(&format!(
                            "552 5.3.4 Message size exceeds the limit of {} octets",
                            self.inbound.max_bytes
                        ))
                        .await?;
                    } else {
                        mail = true;
                        self.reply("250 2.1.0 OK").await?;
                    }
                }
                "RCPT" => {
                    if !mail {
                        self.reply("503 5.5.1 MAIL first").await?;
                        continue;
                    }
                    let Some(address) = rest.get(3..).filter(|_| rest.to_ascii_uppercase().starts_with("TO:")) else {
                        self.reply("501 5.5.4 Syntax: RCPT TO:<address>").await?;
                        continue;
                    };
                    let address = path_of(address);
                    if targets.len() >= MAX_RECIPIENTS {
                        self.reply("452 4.5.3 Too many recipients").await?;
                    } else if let Some(target) = self.target(&address) {
                        targets.push((address, target));
                        self.reply("250 2.1.5 OK").await?;
                    } else {
                        // One answer for every refusal, so probing cannot tell a wrong
                        // signature from an address that is not ours.
                        tracing::info!(rcpt = %address, "feedback listener: recipient refused");
                        self.reply("550 5.1.1 No such mailbox here: this host takes bounces and feedback reports only")
                            .await?;
                    }
                }
                "DATA" => {
                    if targets.is_empty() {
                        self.reply("554 5.5.1 No valid recipients").await?;
                        continue;
                    }
                    self.reply("354 End data with <CR><LF>.<CR><LF>").await?;
                    // Held until the message is recorded (or refused) and dropped.
                    let inbound = self.inbound;
                    let mut charged = Charge::new(&inbound.memory, inbound.max_bytes);
                    let data = match tokio::time::timeout(DATA_TIMEOUT, self.data(&mut charged)).await {
                        Ok(data) => data?,
                        Err(_) => return self.reply("421 4.4.2 Timeout reading the message").await,
                    };
                    let reply = match data {
                        Data::Message(raw) => self.take(&raw, &targets).await,
                        Data::TooLarge => {
                            tracing::warn!(
                                limit = self.inbound.max_bytes,
                                "feedback listener: message over FEEDBACK_MAX_BYTES refused"
                            );
                            format!("552 5.3.4 Message size exceeds the limit of {} octets", self.inbound.max_bytes)
                        }
                        Data::LineTooLong => {
                            format!("554 5.6.0 A line of the message is longer than {MAX_LINE} octets")
                        }
                        Data::Busy => {
                            tracing::warn!("feedback listener: too many messages in memory; one answered 452");
                            "452 4.3.1 Too many reports at once; try again later".to_owned()
                        }
                    };
                    drop(charged);
                    (mail, targets) = (false, Vec::new());
                    self.reply(&reply).await?;
                }
                "RSET" => {
                    (mail, targets) = (false, Vec::new());
                    self.reply("250 2.0.0 OK").await?;
                }
                "NOOP" => self.reply("250 2.0.0 OK").await?,
                "VRFY" => self.reply("252 2.5.2 Cannot verify").await?,
                "QUIT" => return self.reply("221 2.0.0 Bye").await,
                "STARTTLS" | "AUTH" | "BDAT" | "ETRN" | "EXPN" | "TURN" => {
                    self.reply("502 5.5.1 Command not implemented").await?
                }
                _ => self.reply("500 5.5.2 Command unrecognized").await?,
            }
        }
    }

    /// The letter an address is a return path of, or the feedback loop.
    fn target(&self, address: &str) -> Option<Target> {
        if let Some(loop_address) = &self.inbound.loop_address
            && address.eq_ignore_ascii_case(loop_address)
        {
            return Some(Target::Loop);
        }
        self.inbound.return_paths.verify(address).ok().map(Target::Letter)
    }

    /// Records the message once per letter it was sent to (a message for two return paths
    /// reports on two letters), answering 250 once all are recorded.
    async fn take(&self, raw: &[u8], targets: &[(String, Target)]) -> String {
        let rcpt: Vec<String> = targets.iter().map(|(address, _)| address.clone()).collect();
        let mut letters: Vec<Option<ObjectId>> = Vec::new();
        for (_, target) in targets {
            let letter = match target {
                Target::Letter(id) => Some(*id),
                Target::Loop => None,
            };
            if !letters.contains(&letter) {
                letters.push(letter);
            }
        }
        for letter in letters {
            match self.inbound.recorder.take(raw, letter, &self.inbound.return_paths, &rcpt).await {
                Ok(_) => {}
                Err(TryLater::InFlight) => return "451 4.3.0 This report is being recorded; try again later".into(),
                Err(TryLater::Failed(error)) => {
                    tracing::error!(error = format!("{error:#}"), "feedback report not recorded; answered 451");
                    return "451 4.3.0 Temporary failure recording the report; try again later".into();
                }
            }
        }
        "250 2.0.0 Report recorded".into()
    }

    /// The message up to its final dot, dot-unstuffed, charged to the memory budget as it
    /// grows. Past the limit (or a line past [`MAX_LINE`], or the budget spent) the rest is read
    /// and dropped, so the session stays in step and the refusal reaches the sender.
    async fn data(&mut self, charged: &mut Charge<'_>) -> std::io::Result<Data> {
        let mut message = Vec::new();
        let mut refused = None;
        loop {
            let line = match self.line(MAX_LINE).await? {
                Line::Text(line) => line,
                Line::TooLong => {
                    refused.get_or_insert(Data::LineTooLong);
                    message = Vec::new();
                    charged.release();
                    continue;
                }
                Line::Closed => {
                    return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed in DATA"));
                }
            };
            if line == b".\r\n" || line == b".\n" {
                return Ok(refused.unwrap_or(Data::Message(message)));
            }
            if refused.is_some() {
                continue;
            }
            let line = line.strip_prefix(b".").unwrap_or(&line);
            if message.len() + line.len() > self.inbound.max_bytes {
                refused = Some(Data::TooLarge);
                message = Vec::new();
                charged.release();
                continue;
            }
            if !charged.cover(message.len() + line.len()) {
                refused = Some(Data::Busy);
                message = Vec::new();
                charged.release();
                continue;
            }
            message.extend_from_slice(line);
        }
    }

    /// One line, with its line end, of at most `max` octets; a longer one is read to its end
    /// and dropped. A line cut off by the peer closing is no line.
    async fn line(&mut self, max: usize) -> std::io::Result<Line> {
        let mut line = Vec::new();
        let mut too_long = false;
        loop {
            let buffer = self.reader.fill_buf().await?;
            if buffer.is_empty() {
                return Ok(Line::Closed);
            }
            let end = buffer.iter().position(|&b| b == b'\n');
            let take = end.map_or(buffer.len(), |e| e + 1);
            if !too_long {
                if line.len() + take > max {
                    too_long = true;
                    line = Vec::new();
                } else {
                    line.extend_from_slice(&buffer[..take]);
                }
            }
            self.reader.consume(take);
            if end.is_some() {
                return Ok(if too_long { Line::TooLong } else { Line::Text(line) });
            }
        }
    }

    async fn reply(&mut self, reply: &str) -> std::io::Result<()> {
        self.writer.write_all(format!("{reply}\r\n").as_bytes()).await?;
        self.writer.flush().await
    }
}

/// A message's share of [`Inbound::memory`], taken as its data arrives and given back when
/// dropped.
struct Charge<'a> {
    memory: &'a Semaphore,
    permits: Vec<tokio::sync::SemaphorePermit<'a>>,
    kib: usize,
    /// The most one message may take: `FEEDBACK_MAX_BYTES`.
    most_kib: usize,
}

impl<'a> Charge<'a> {
    fn new(memory: &'a Semaphore, max_bytes: usize) -> Charge<'a> {
        Charge { memory, permits: Vec::new(), kib: 0, most_kib: max_bytes.div_ceil(KIB) }
    }

    /// Takes what `bytes` need beyond what is held, without waiting: false when the budget is
    /// spent (waiting could deadlock, every connection holding part of a message).
    fn cover(&mut self, bytes: usize) -> bool {
        let kib = bytes.div_ceil(KIB);
        if kib <= self.kib {
            return true;
        }
        // Ahead by 64 KiB at a time (never past the message's limit), so a large message takes a
        // permit per 64 KiB, not per line.
        let want = (kib - self.kib).max(64.min(self.most_kib.saturating_sub(self.kib)));
        let Ok(want) = u32::try_from(want) else { return false };
        match self.memory.try_acquire_many(want) {
            Ok(permit) => {
                self.permits.push(permit);
                self.kib += want as usize;
                true
            }
            Err(_) => false,
        }
    }

    fn release(&mut self) {
        self.permits.clear();
        self.kib = 0;
    }
}

/// `<a@b> SIZE=123` → `a@b`, and the null path `<>` → ``.
fn path_of(argument: &str) -> String {
    let argument = argument.trim();
    match (argument.find('<'), argument.find('>')) {
        (Some(open), Some(close)) if open < close => argument[open + 1..close].trim().to_owned(),
        _ => argument.split_whitespace().next().unwrap_or_default().to_owned(),
    }
}

/// The `SIZE=` a MAIL command declares (RFC 1870).
fn declared_size(argument: &str) -> Option<usize> {
    argument
        .split_whitespace()
        .filter_map(|word| word.split_once('='))
        .find(|(name, _)| name.eq_ignore_ascii_case("SIZE"))
        .and_then(|(_, value)| value.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_sizes_are_read_from_commands() {
        assert_eq!(path_of("<Bounces+x.y@b.example> SIZE=10"), "Bounces+x.y@b.example");
        assert_eq!(path_of(" <> "), "");
        assert_eq!(path_of("bare@b.example"), "bare@b.example");
        assert_eq!(declared_size("FROM:<> SIZE=52428800 BODY=8BITMIME"), Some(52_428_800));
        assert_eq!(declared_size("FROM:<>"), None);
        assert_eq!(declared_size("FROM:<> size=12"), Some(12));
    }
}
