//! The sandbox's relay (`SMTP_SANDBOX`): a transaction that accepts every recipient and the
//! message and hands the message to no one. It opens no connection, so the service runs where
//! no relay is reachable (a producer's CI). It takes the place of [`super::transaction::send`]
//! and nothing else: `before_end` (the budget's unit, the lease, `NotAfter`) is still awaited
//! before the "final dot", and the replies are judged as a relay's are, so every other stage
//! behaves as it does in production.

use std::time::Duration;

use super::{
    reply::{Command, EnhancedCode, Reply, SmtpError},
    transaction::{RcptResult, Transaction},
};
use crate::address::Recipient;

/// The text of the reply to the final dot, which becomes each letter's `LastReply`.
pub const LAST_REPLY_TEXT: &str = "sandbox: not handed to a relay";

/// What errors and logs name as the server.
pub const SERVER: &str = "sandbox";

/// One transaction to `recipients` that delivers nothing; see [`super::transaction::send`] for
/// `before_end`.
pub async fn send(
    recipients: &[Recipient],
    before_end: impl Future<Output = Option<Duration>>,
) -> Result<Transaction, SmtpError> {
    if recipients.is_empty() {
        return Ok(Transaction { mail: None, rcpt: Vec::new(), data: None, end: None });
    }
    let ok = |command: Command, text: &str| Reply {
        code: 250,
        enhanced: Some(EnhancedCode { class: 2, subject: 0, detail: 0 }),
        text: text.to_owned(),
        command,
    };
    let mail = ok(Command::MailFrom, "sender ok");
    let rcpt = recipients.iter().map(|_| RcptResult::Replied(ok(Command::RcptTo, "recipient ok"))).collect();
    let data =
        Reply { code: 354, enhanced: None, text: "end data with <CR><LF>.<CR><LF>".into(), command: Command::Data };
    if before_end.await.is_none() {
        return Err(SmtpError::Withdrawn { server: SERVER.to_owned() });
    }
    Ok(Transaction { mail: Some(mail), rcpt, data: Some(data), end: Some(ok(Command::DataEnd, LAST_REPLY_TEXT)) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_recipient_is_taken_and_nothing_goes_anywhere() {
        let recipients: Vec<Recipient> =
            ["a@example.org", "Ünï@example.org"].iter().map(|a| Recipient::parse(a).unwrap()).collect();
        let taken = send(&recipients, async { Some(Duration::from_secs(1)) }).await.unwrap();
        assert!(taken.delivered());
        assert_eq!(taken.rcpt.len(), 2);
        assert_eq!(taken.end.unwrap().to_string(), "250 2.0.0 sandbox: not handed to a relay");
        // Withdrawn before the dot (no budget unit, a lease not vouched for): as with a relay.
        let withdrawn = send(&recipients, async { None }).await.unwrap_err();
        assert!(matches!(withdrawn, SmtpError::Withdrawn { .. }), "{withdrawn}");
        assert_eq!(send(&[], async { None }).await.unwrap().mail, None);
    }
}
