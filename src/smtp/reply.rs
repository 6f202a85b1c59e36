//! SMTP replies as values (RFC 5321 §4.2, enhanced status codes of RFC 3463), and the client's
//! error. A reply keeps the command it answered, because the same code means different things
//! after different commands (552 after RCPT is "too many recipients", after the data it is
//! "message too big").

use std::{fmt, time::Duration};

/// The command a reply answered; also names the phase an error happened in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Connect,
    Greeting,
    Ehlo,
    StartTls,
    Auth,
    MailFrom,
    RcptTo,
    Data,
    /// Writing the message and reading the reply to the final dot.
    DataEnd,
    Rset,
    Noop,
    Quit,
}

impl Command {
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Connect => "connecting",
            Command::Greeting => "greeting",
            Command::Ehlo => "EHLO",
            Command::StartTls => "STARTTLS",
            Command::Auth => "AUTH",
            Command::MailFrom => "MAIL FROM",
            Command::RcptTo => "RCPT TO",
            Command::Data => "DATA",
            Command::DataEnd => "message data",
            Command::Rset => "RSET",
            Command::Noop => "NOOP",
            Command::Quit => "QUIT",
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An enhanced status code (RFC 3463), `class.subject.detail`, e.g. 5.1.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EnhancedCode {
    pub class: u8,
    pub subject: u16,
    pub detail: u16,
}

impl fmt::Display for EnhancedCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.class, self.subject, self.detail)
    }
}

impl EnhancedCode {
    /// Parses the code at the start of a reply's text, as servers that advertise
    /// ENHANCEDSTATUSCODES (and most that do not) write it.
    fn parse_prefix(text: &str) -> Option<(EnhancedCode, &str)> {
        let (word, rest) = text.split_once(' ').unwrap_or((text, ""));
        let mut parts = word.split('.');
        let class: u8 = parts.next()?.parse().ok()?;
        let subject: u16 = parts.next()?.parse().ok()?;
        let detail: u16 = parts.next()?.parse().ok()?;
        if parts.next().is_some() || !matches!(class, 2 | 4 | 5) || subject > 999 || detail > 999 {
            return None;
        }
        Some((EnhancedCode { class, subject, detail }, rest))
    }
}

/// One complete (possibly multi-line) reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub enhanced: Option<EnhancedCode>,
    /// The text of every line, without codes, joined with a space.
    pub text: String,
    pub command: Command,
}

impl Reply {
    /// Parses the lines of one reply (without CRLF), all carrying the same code.
    pub fn parse(lines: &[String], command: Command) -> Result<Reply, String> {
        let mut code = None;
        // The lines' texts joined with a space, built in place: a reply is parsed several times
        // per letter (issue 23).
        let mut joined = String::with_capacity(lines.iter().map(|l| l.len()).sum::<usize>());
        let mut enhanced = None;
        for (i, line) in lines.iter().enumerate() {
            let digits = line.get(..3).filter(|d| d.bytes().all(|b| b.is_ascii_digit()));
            let Some(digits) = digits else { return Err(format!("malformed SMTP reply line {line:?}")) };
            let this: u16 = digits.parse().map_err(|_| format!("malformed SMTP reply line {line:?}"))?;
            if !(200..600).contains(&this) || code.is_some_and(|c| c != this) {
                return Err(format!("malformed SMTP reply line {line:?}"));
            }
            code = Some(this);
            let text = line.get(4..).unwrap_or_default();
            let text = match EnhancedCode::parse_prefix(text) {
                Some((found, rest)) => {
                    enhanced.get_or_insert(found);
                    rest
                }
                None => text,
            };
            if i > 0 {
                joined.push(' ');
            }
            joined.push_str(text.trim());
        }
        let code = code.ok_or_else(|| "empty SMTP reply".to_owned())?;
        let trimmed = joined.trim();
        if trimmed.len() != joined.len() {
            joined = trimmed.to_owned();
        }
        Ok(Reply { code, enhanced, text: joined, command })
    }

    pub fn is_positive(&self) -> bool {
        self.code < 400
    }

    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    pub fn is_permanent(&self) -> bool {
        self.code >= 500
    }

    /// "Too many recipients" (RFC 5321 §4.5.3.1.10): 452 after RCPT, and 552 after RCPT, which
    /// the RFC asks clients to treat the same way. The remaining recipients go in a new
    /// transaction at once.
    pub fn is_too_many_recipients(&self) -> bool {
        self.command == Command::RcptTo
            && (self.code == 452 || self.code == 552)
            && self.enhanced.is_none_or(|e| (e.subject, e.detail) == (5, 3) || e.subject != 1)
    }

    /// The server says "too fast": a rate or connection limit of the relay, not a judgement of the
    /// letter. Only a transient (4xx) reply is one: a relay that answers 5xx has said not to try
    /// again, whatever its words. Told apart from other transient replies by the enhanced codes
    /// relays reserve for it, and otherwise by the words of [`THROTTLE_PHRASES`], since RFC 5321
    /// has no reply code of its own for it.
    pub fn is_throttle(&self) -> bool {
        if !self.is_transient() || self.is_too_many_recipients() {
            return false;
        }
        if let Some(e) = self.enhanced {
            // X.2.2 is a full mailbox (RFC 3463), even where the text says "too many messages".
            if (e.subject, e.detail) == (2, 2) {
                return false;
            }
            if is_throttle_code(e) {
                return true;
            }
        }
        let text = self.text.to_ascii_lowercase();
        THROTTLE_PHRASES.iter().any(|phrase| text.contains(phrase))
    }

    /// The reply faults the session, not the message: 503 "bad sequence of commands" to MAIL,
    /// where the server thinks a transaction is still open (Postfix keeps one it refused). The
    /// same message on a new connection starts clean.
    pub fn was_due_to_session(&self) -> bool {
        self.command == Command::MailFrom && self.code == 503
    }

    /// 421 (RFC 5321 §3.8): the server is closing the channel, whatever the message. A throttle
    /// 421 is not one: it slows the sending down instead.
    pub fn is_closing(&self) -> bool {
        self.code == 421 && !self.is_throttle()
    }

    /// The mailbox does not exist (5.1.x): the address itself is bad, not the message.
    pub fn is_bad_mailbox(&self) -> bool {
        self.is_permanent() && self.enhanced.is_some_and(|e| e.class == 5 && e.subject == 1)
    }
}

/// Enhanced codes that mean "too fast" whatever the text:
/// - 4.7.28, Gmail's "421 4.7.28 … unusual rate of unsolicited mail" (Gmail's SMTP error reference,
///   support.google.com/a/answer/3726730);
/// - 4.7.500 to 4.7.699, the range Microsoft 365 / Exchange Online Protection defers a sending IP
///   with, as in "451 4.7.500 Server busy. Please try again later from [ip]. (S77714)" (Microsoft
///   Tech Community, "Office365 throttling inbound messages S77719") and "421 4.7.650 … temporarily
///   rate limited due to IP reputation". Its X.7.133 to X.7.136 ("sender not authenticated for
///   group/mailbox") are 5xx and not a rate; no 4.7.133/4.7.134 rate reply is documented.
fn is_throttle_code(e: EnhancedCode) -> bool {
    e.class == 4 && e.subject == 7 && (e.detail == 28 || (500..=699).contains(&e.detail))
}

/// Lower-case phrases of the throttle replies of the relays users run, each from the relay's
/// documentation or source (`tests/postfix.rs` checks Postfix's against a real one):
pub const THROTTLE_PHRASES: &[&str] = &[
    // Postfix anvil(8) limits (smtpd.c; postconf(5) smtpd_client_*_limit): "450 4.7.1 Error: too much
    // mail from <ip>" (message rate), "421 4.7.0 <host> Error: too many connections from <ip>"
    // (connection count and rate), "450 4.7.1 Error: too many recipients from <ip>" (recipient rate;
    // its 452 "too many recipients" of smtpd_recipient_limit is the per-transaction cap, told apart
    // above), "421/454 4.7.0 Error: too many new TLS sessions from <ip>", "450 4.7.1 Error: too many
    // AUTH commands from <ip>".
    "too much mail from",
    "too many connections",
    "too many recipients from",
    "too many new tls sessions",
    "too many auth commands",
    // Exim: the ratelimit ACL condition's deferrals carry the administrator's text, usually naming the
    // rate ("Sender rate overlimit", "rate limit exceeded"; Exim spec, "Rate limiting incoming
    // messages"); smtp_accept_max_per_host answers "421 Too many concurrent SMTP connections from this
    // IP address; please try again later"; cPanel's Exim "Domain … has exceeded the max emails per
    // hour (…) allowed. Message will be reattempted later".
    "rate limit",
    "rate-limit",
    "ratelimit",
    "sender rate",
    "overlimit",
    "too many concurrent",
    "emails per hour",
    // Exchange: a receive connector's MessageRateLimit, "421 4.4.2 Message submission rate for this
    // client has exceeded the configured limit" (its text as relays quote it, e.g. serverfault.com
    // question 833887); its connection limits, "421 4.3.2 The maximum number
    // of concurrent connections has exceeded a limit, closing transmission channel"; EOP's "451
    // 4.7.500 Server busy. Please try again later".
    "submission rate",
    "concurrent connections",
    "server busy",
    // Gmail (support.google.com/a/answer/3726730): "450 4.2.1 The user you are trying to contact is
    // receiving mail at a rate that prevents additional messages from being delivered", "… receiving
    // mail too quickly", "450 4.2.1 Peak SMTP relay limit exceeded for this customer", "421 4.7.0 …
    // unusual rate of unsolicited mail … temporarily rate limited".
    "at a rate",
    "too quickly",
    "relay limit exceeded",
    "unusual rate",
    // Amazon SES (docs.aws.amazon.com/ses/latest/dg/manage-sending-quotas-errors.html): "454
    // Throttling failure: Maximum sending rate exceeded", "454 Throttling failure: Daily message quota
    // exceeded".
    "throttl",
    "sending rate",
    // Other relays' plain words for it.
    "too fast",
    "too many messages",
    "slow down",
];

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.code)?;
        if let Some(enhanced) = self.enhanced {
            write!(f, " {enhanced}")?;
        }
        if !self.text.is_empty() {
            write!(f, " {}", self.text)?;
        }
        Ok(())
    }
}

/// Why an SMTP exchange could not go on. A negative reply to a command of a transaction is not
/// an error (it is a [`Reply`] the caller judges); these are the cases where the session itself
/// failed.
#[derive(Debug, thiserror::Error)]
pub enum SmtpError {
    #[error("{command} to {server}: {source}")]
    Io {
        command: Command,
        server: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} to {server}: no reply within {}", humantime::format_duration(*after))]
    Timeout { command: Command, server: String, after: Duration },
    #[error("{command} to {server}: the server closed the connection")]
    Closed { command: Command, server: String },
    /// A negative reply where the session cannot go on (greeting, EHLO, STARTTLS, AUTH).
    #[error("{} to {server} refused: {reply}", reply.command)]
    Refused { reply: Reply, server: String },
    #[error("{command} to {server}: {message}")]
    Protocol { command: Command, server: String, message: String },
    #[error("TLS with {server}: {message}")]
    Tls { server: String, message: String },
    /// Sending would break a rule the operator set (TLS required, no credentials in clear text).
    #[error("{0}")]
    Policy(String),
    /// The message was withdrawn before its final `.` (the caller could no longer vouch for
    /// it), and the connection dropped so the server discards it.
    #[error("message to {server} withdrawn before its final dot")]
    Withdrawn { server: String },
}

impl SmtpError {
    /// The phase the session failed in.
    pub fn command(&self) -> Command {
        match self {
            SmtpError::Io { command, .. }
            | SmtpError::Timeout { command, .. }
            | SmtpError::Closed { command, .. }
            | SmtpError::Protocol { command, .. } => *command,
            SmtpError::Refused { reply, .. } => reply.command,
            SmtpError::Tls { .. } => Command::StartTls,
            SmtpError::Policy(_) => Command::Connect,
            SmtpError::Withdrawn { .. } => Command::Data,
        }
    }

    /// Retrying later may help (everything but a 5xx refusal of the session or a policy the
    /// operator must change).
    pub fn is_transient(&self) -> bool {
        match self {
            SmtpError::Refused { reply, .. } => !reply.is_permanent(),
            _ => true,
        }
    }

    /// The error came after the message was handed over: it may have been delivered.
    pub fn may_have_delivered(&self) -> bool {
        self.command() == Command::DataEnd
    }

    /// Due to the connection, not the message: it broke or was closed after the session opened and
    /// before the message was handed over, as a kept connection does when the server dropped it
    /// while idle. The same message on a new connection cannot be a duplicate.
    pub fn was_due_to_connection(&self) -> bool {
        matches!(self, SmtpError::Io { .. } | SmtpError::Closed { .. })
            && !matches!(self.command(), Command::DataEnd | Command::Connect | Command::Greeting)
    }

    /// Due to the relay, not the message: within a session it had opened (past EHLO, STARTTLS and
    /// AUTH) and before the message's final dot, the connection broke or timed out, or the relay
    /// said it is closing (421). Another relay may take the same message, and cannot have it
    /// twice. Failures while connecting are not among them: `Relays::connect` moves past those.
    pub fn was_due_to_relay(&self) -> bool {
        let in_session = !matches!(
            self.command(),
            Command::DataEnd | Command::Connect | Command::Greeting | Command::Ehlo | Command::StartTls | Command::Auth
        );
        let failed = match self {
            SmtpError::Io { .. } | SmtpError::Closed { .. } | SmtpError::Timeout { .. } => true,
            SmtpError::Refused { reply, .. } => reply.is_closing(),
            _ => false,
        };
        in_session && failed
    }

    /// The relay's "too fast" reply (see [`Reply::is_throttle`]), when the error is one.
    pub fn throttle(&self) -> Option<&Reply> {
        self.reply().filter(|reply| reply.is_throttle())
    }

    /// The reply behind the error, when the server gave one.
    pub fn reply(&self) -> Option<&Reply> {
        match self {
            SmtpError::Refused { reply, .. } => Some(reply),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(line: &str, command: Command) -> Reply {
        Reply::parse(&[line.to_owned()], command).unwrap()
    }

    #[test]
    fn parses_codes_enhanced_codes_and_multiline_text() {
        let r = Reply::parse(&["250-first".into(), "250 2.1.0 second".into()], Command::MailFrom).unwrap();
        assert_eq!(r.code, 250);
        assert_eq!(r.text, "first second");
        let r = reply("550 5.1.1 <x@y.org>: Recipient address rejected", Command::RcptTo);
        assert_eq!(r.enhanced, Some(EnhancedCode { class: 5, subject: 1, detail: 1 }));
        assert_eq!(r.to_string(), "550 5.1.1 <x@y.org>: Recipient address rejected");
        assert!(r.is_permanent() && r.is_bad_mailbox());
        assert_eq!(reply("250", Command::Noop).text, "");
        for bad in ["25 ok", "abc ok", "999 x", ""] {
            assert!(Reply::parse(&[bad.to_owned()], Command::Noop).is_err(), "{bad}");
        }
        assert!(Reply::parse(&["250-a".into(), "251 b".into()], Command::Noop).is_err());
        // Texts joined with one space each, the whole trimmed: as `join(" ").trim()` did.
        let lines = ["451-4.7.0  a ".into(), "451-".into(), "451 4.7.0 b  ".into()];
        assert_eq!(Reply::parse(&lines, Command::Data).unwrap().text, "a  b");
        assert_eq!(Reply::parse(&["250-".into(), "250 x".into()], Command::Noop).unwrap().text, "x");
    }

    #[test]
    fn replies_are_classified_by_value() {
        // (reply, command, too many recipients, throttle, transient, bad mailbox)
        let table = [
            ("452 4.5.3 Too many recipients", Command::RcptTo, true, false, true, false),
            ("552 5.5.3 Too many recipients", Command::RcptTo, true, false, false, false),
            ("452 Too many recipients received this hour", Command::RcptTo, true, false, true, false),
            ("552 5.3.4 Message size exceeds fixed limit", Command::DataEnd, false, false, false, false),
            ("552 5.2.2 Mailbox full", Command::RcptTo, true, false, false, false),
            (
                "454 4.7.0 Throttling failure: Maximum sending rate exceeded.",
                Command::MailFrom,
                false,
                true,
                true,
                false,
            ),
            (
                "450 4.2.1 The user you are trying to contact is receiving mail at a rate that prevents additional messages from being delivered",
                Command::RcptTo,
                false,
                true,
                true,
                false,
            ),
            (
                "421 4.7.28 Our system has detected an unusual rate of unsolicited mail",
                Command::MailFrom,
                false,
                true,
                true,
                false,
            ),
            (
                "421 4.3.2 Service not available, closing transmission channel",
                Command::Greeting,
                false,
                false,
                true,
                false,
            ),
            ("451 4.3.0 Temporary local problem", Command::DataEnd, false, false, true, false),
            ("454 4.7.0 TLS not available due to local problem", Command::StartTls, false, false, true, false),
            ("550 5.1.1 No such user", Command::RcptTo, false, false, false, true),
            ("550 5.7.1 Message rejected by policy", Command::RcptTo, false, false, false, false),
            ("503 5.5.1 Error: nested MAIL command", Command::MailFrom, false, false, false, false),
        ];
        for (line, command, too_many, throttle, transient, bad_mailbox) in table {
            let r = reply(line, command);
            assert_eq!(r.is_too_many_recipients(), too_many, "too many: {line}");
            assert_eq!(r.is_throttle(), throttle, "throttle: {line}");
            assert_eq!(r.is_transient(), transient, "transient: {line}");
            assert_eq!(r.is_bad_mailbox(), bad_mailbox, "bad mailbox: {line}");
        }
    }

    #[test]
    fn errors_say_whether_the_connection_or_the_relay_failed() {
        let server = || "relay:25".to_owned();
        let io = |command| SmtpError::Io { command, server: server(), source: std::io::ErrorKind::BrokenPipe.into() };
        let refused = |line, command| SmtpError::Refused { reply: reply(line, command), server: server() };
        // (error, due to the connection, due to the relay, may have delivered)
        let table = [
            (io(Command::MailFrom), true, true, false),
            (io(Command::Rset), true, true, false),
            (SmtpError::Closed { command: Command::RcptTo, server: server() }, true, true, false),
            (io(Command::Ehlo), true, false, false),
            (io(Command::Greeting), false, false, false),
            (io(Command::Connect), false, false, false),
            (io(Command::DataEnd), false, false, true),
            (
                SmtpError::Timeout { command: Command::Data, server: server(), after: Duration::from_secs(1) },
                false,
                true,
                false,
            ),
            (refused("421 4.3.2 closing transmission channel", Command::MailFrom), false, true, false),
            (refused("421 4.7.0 too many connections from 127.0.0.1", Command::MailFrom), false, false, false),
            (refused("421 4.3.2 closing transmission channel", Command::Ehlo), false, false, false),
            (refused("554 5.7.1 no", Command::Greeting), false, false, false),
            (SmtpError::Withdrawn { server: server() }, false, false, false),
        ];
        for (error, connection, relay, delivered) in table {
            assert_eq!(error.was_due_to_connection(), connection, "connection: {error}");
            assert_eq!(error.was_due_to_relay(), relay, "relay: {error}");
            assert_eq!(error.may_have_delivered(), delivered, "delivered: {error}");
        }
        assert!(refused("421 4.7.0 too many connections from 127.0.0.1", Command::Greeting).throttle().is_some());
        assert!(refused("421 4.3.2 closing transmission channel", Command::Greeting).throttle().is_none());
        assert!(reply("503 5.5.1 Error: nested MAIL command", Command::MailFrom).was_due_to_session());
        assert!(!reply("550 5.7.1 sender rejected", Command::MailFrom).was_due_to_session());
    }

    #[test]
    fn throttle_replies_of_the_relays_users_run() {
        use Command::*;
        // (reply as the relay writes it, the command it answered, a throttle?)
        let table = [
            // Postfix 3.7's anvil limits, as tests/postfix.rs sees a real one answer.
            ("450 4.7.1 Error: too much mail from 127.0.0.1", MailFrom, true),
            ("421 4.7.0 postfix.example.org Error: too many connections from 127.0.0.1", Greeting, true),
            ("450 4.7.1 Error: too many recipients from 127.0.0.1", RcptTo, true),
            ("450 4.7.1 Error: too many recipients from 127.0.0.1", DataEnd, true),
            ("421 4.7.0 postfix.example.org Error: too many new TLS sessions from 127.0.0.1", StartTls, true),
            ("454 4.7.0 Error: too many new TLS sessions from 127.0.0.1", StartTls, true),
            ("450 4.7.1 Error: too many AUTH commands from 127.0.0.1", Auth, true),
            // Postfix's other refusals: a cap per transaction, its error limit, greylisting, DNS.
            ("452 4.5.3 Error: too many recipients", RcptTo, false),
            ("452 4.5.3 Error: too many recipients", DataEnd, false),
            ("421 4.7.0 postfix.example.org Error: too many errors", MailFrom, false),
            ("450 4.7.1 Client host rejected: cannot find your hostname, [10.0.0.1]", RcptTo, false),
            ("450 4.7.1 <x@example.org>: Recipient address rejected: Greylisted, try again later", RcptTo, false),
            ("421 4.4.2 postfix.example.org Error: timeout exceeded", DataEnd, false),
            // Exim: ratelimit deferrals with the texts administrators give them, its connection limit.
            ("450 Sender rate overlimit - 120.0 / 1h", RcptTo, true),
            ("451 Rate limit exceeded, please try again later", MailFrom, true),
            ("421 Too many concurrent SMTP connections from this IP address; please try again later.", Greeting, true),
            (
                "451 Domain example.com has exceeded the max emails per hour (501/500 (100%)) allowed. Message will be reattempted later",
                RcptTo,
                true,
            ),
            ("451 Temporary local problem - please try later", DataEnd, false),
            // Exchange and Microsoft 365.
            ("421 4.4.2 Message submission rate for this client has exceeded the configured limit", MailFrom, true),
            (
                "421 4.3.2 The maximum number of concurrent connections has exceeded a limit, closing transmission channel",
                Greeting,
                true,
            ),
            ("451 4.7.500 Server busy. Please try again later from [203.0.113.10]. (S77714)", RcptTo, true),
            (
                "421 4.7.650 The mail server [203.0.113.10] has been temporarily rate limited due to IP reputation.",
                Greeting,
                true,
            ),
            ("451 4.7.599 Access denied, please try again later", RcptTo, true),
            ("452 4.3.1 Insufficient system resources", MailFrom, false),
            // Permanent refusals are never throttles, whatever they say: the relay said not to retry.
            ("550 5.4.5 Daily user sending quota exceeded.", MailFrom, false),
            ("554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException", DataEnd, false),
            ("550 5.7.133 RESOLVER.RST.SenderNotAuthenticatedForGroup", RcptTo, false),
            // Gmail.
            (
                "450 4.2.1 The user you are trying to contact is receiving mail too quickly. Please resend your message at a later time.",
                RcptTo,
                true,
            ),
            ("450 4.2.1 Peak SMTP relay limit exceeded for this customer. This is a temporary error.", MailFrom, true),
            (
                "421 4.7.0 [203.0.113.10 15] Our system has detected an unusual rate of unsolicited mail originating from your IP address.",
                DataEnd,
                true,
            ),
            ("421 4.7.28 Gmail has detected an unusual rate of mail originating from your SPF domain", DataEnd, true),
            (
                "550 5.2.1 The user you are trying to contact is receiving mail at a rate that prevents additional messages from being delivered.",
                RcptTo,
                false,
            ),
            ("452 4.2.2 The email account that you tried to reach is over quota.", RcptTo, false),
            ("452 4.2.2 Mailbox full: too many messages", RcptTo, false),
            // Amazon SES.
            ("454 Throttling failure: Maximum sending rate exceeded.", MailFrom, true),
            ("454 Throttling failure: Daily message quota exceeded.", MailFrom, true),
            ("454 4.7.0 Temporary authentication failure", Auth, false),
        ];
        for (line, command, throttle) in table {
            let r = Reply::parse(&[line.to_owned()], command).unwrap();
            assert_eq!(r.is_throttle(), throttle, "throttle: {line}");
        }
    }
}
