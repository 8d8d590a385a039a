//! RabbitMQ's STOMP destinations (`rabbit_routing_util`): parsing the
//! `destination` header and rebuilding it for MESSAGE frames.
//!
//! | destination | SEND goes to | SUBSCRIBE reads |
//! |---|---|---|
//! | `/queue/N` | `""` / `N` (after declaring `N` durable) | `N` (declared durable) |
//! | `/amq/queue/N` | `""` / `N` (not declared) | `N` (must exist) |
//! | `/topic/K` | `amq.topic` / `K` | a subscription queue bound to `amq.topic` with `K` |
//! | `/exchange/X[/K]` | `X` / `K` (or `""`) | a subscription queue bound to `X` with `K` |
//! | `/temp-queue/N` | the session's temporary queue `N` | (not subscribable) |
//! | `/reply-queue/Q` | `""` / `Q` | (not subscribable) |
//!
//! A `/` inside a name is written `%2F` (RabbitMQ's escaping).

use std::fmt;

/// A parsed destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// `/queue/NAME`
    Queue(String),
    /// `/amq/queue/NAME`
    AmqQueue(String),
    /// `/topic/KEY`
    Topic(String),
    /// `/exchange/NAME[/KEY]`
    Exchange(String, Option<String>),
    /// `/temp-queue/NAME`
    TempQueue(String),
    /// `/reply-queue/QUEUE` (names may hold slashes)
    ReplyQueue(String),
}

/// The prefixes, as RabbitMQ lists them in its error text.
pub const VALID_PREFIXES: &str = "/exchange/, /topic/, /queue/, /amq/queue/, /temp-queue/, /reply-queue/";

/// Why a destination is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DestError {
    /// No known prefix.
    Unknown(String),
    /// A known prefix with a missing or malformed name.
    Invalid(String),
}

impl fmt::Display for DestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DestError::Unknown(d) => {
                write!(f, "'{d}' is not a valid destination.\nValid destination types are: {VALID_PREFIXES}.")
            }
            DestError::Invalid(d) => write!(f, "'{d}' is not a valid destination."),
        }
    }
}

impl Destination {
    /// Parses a `destination` header.
    pub fn parse(d: &str) -> Result<Destination, DestError> {
        let invalid = || DestError::Invalid(d.to_string());
        let simple = |rest: &str| -> Result<String, DestError> {
            let parts = split(rest);
            match parts.as_slice() {
                [name] if !name.is_empty() => Ok(name.clone()),
                _ => Err(invalid()),
            }
        };
        if let Some(rest) = d.strip_prefix("/queue/") {
            return Ok(Destination::Queue(simple(rest)?));
        }
        if let Some(rest) = d.strip_prefix("/topic/") {
            return Ok(Destination::Topic(simple(rest)?));
        }
        if let Some(rest) = d.strip_prefix("/amq/queue/") {
            return Ok(Destination::AmqQueue(simple(rest)?));
        }
        if let Some(rest) = d.strip_prefix("/temp-queue/") {
            return Ok(Destination::TempQueue(simple(rest)?));
        }
        if let Some(rest) = d.strip_prefix("/reply-queue/") {
            if rest.is_empty() {
                return Err(invalid());
            }
            return Ok(Destination::ReplyQueue(rest.to_string()));
        }
        if let Some(rest) = d.strip_prefix("/exchange/") {
            let parts = split(rest);
            return match parts.as_slice() {
                // The default exchange cannot be named this way (RabbitMQ).
                [name] if !name.is_empty() => Ok(Destination::Exchange(name.clone(), None)),
                [name, key] if !name.is_empty() => Ok(Destination::Exchange(name.clone(), Some(key.clone()))),
                _ => Err(invalid()),
            };
        }
        Err(DestError::Unknown(d.to_string()))
    }

    /// Exchange and routing key a SEND to this destination publishes with
    /// (temporary queues are resolved by the session first).
    pub fn routing(&self) -> (String, String) {
        match self {
            Destination::Queue(n) | Destination::AmqQueue(n) | Destination::ReplyQueue(n) | Destination::TempQueue(n) => {
                (String::new(), n.clone())
            }
            Destination::Topic(k) => ("amq.topic".into(), k.clone()),
            Destination::Exchange(x, k) => (x.clone(), k.clone().unwrap_or_default()),
        }
    }
}

/// Splits the part after the prefix at `/` and unescapes `%2F`.
fn split(rest: &str) -> Vec<String> {
    rest.split('/').map(|s| s.replace("%2F", "/")).collect()
}

/// The destination a MESSAGE shows for a message published to `exchange`
/// with `routing_key` (RabbitMQ's `format_destination`).
pub fn format(exchange: &str, routing_key: &str) -> String {
    match (exchange, routing_key) {
        ("", rk) => format!("/queue/{}", escape(rk)),
        ("amq.topic", rk) => format!("/topic/{}", escape(rk)),
        (x, "") => format!("/exchange/{}", escape(x)),
        (x, rk) => format!("/exchange/{}/{}", escape(x), escape(rk)),
    }
}

/// `/` → `%2F`, `%` → `%25`, control and non-ASCII octets → `%XX`.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'/' => out.push_str("%2F"),
            b'%' => out.push_str("%25"),
            b if !(32..=127).contains(&b) => out.push_str(&format!("%{b:02X}")),
            b => out.push(b as char),
        }
    }
    out
}

/// Whether `reply-to` already names a destination (else MESSAGE shows it
/// as `/reply-queue/VALUE`, as RabbitMQ does).
pub fn has_prefix(v: &str) -> bool {
    ["/exchange/", "/topic/", "/queue/", "/amq/queue/", "/temp-queue/", "/reply-queue/"].iter().any(|p| v.starts_with(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rabbitmq_destinations() {
        assert_eq!(Destination::parse("/queue/a"), Ok(Destination::Queue("a".into())));
        assert_eq!(Destination::parse("/queue/a%2Fb"), Ok(Destination::Queue("a/b".into())));
        assert_eq!(Destination::parse("/topic/x.*.y"), Ok(Destination::Topic("x.*.y".into())));
        assert_eq!(Destination::parse("/amq/queue/q"), Ok(Destination::AmqQueue("q".into())));
        assert_eq!(Destination::parse("/exchange/amq.direct"), Ok(Destination::Exchange("amq.direct".into(), None)));
        assert_eq!(Destination::parse("/exchange/x/k"), Ok(Destination::Exchange("x".into(), Some("k".into()))));
        assert_eq!(Destination::parse("/reply-queue/a/b"), Ok(Destination::ReplyQueue("a/b".into())));
        assert!(matches!(Destination::parse("/queue/"), Err(DestError::Invalid(_))));
        assert!(matches!(Destination::parse("/queue/a/b"), Err(DestError::Invalid(_))));
        assert!(matches!(Destination::parse("/exchange//k"), Err(DestError::Invalid(_))));
        assert!(matches!(Destination::parse("/exchange/x/k/z"), Err(DestError::Invalid(_))));
        assert!(matches!(Destination::parse("queue"), Err(DestError::Unknown(_))));
    }

    #[test]
    fn formats_like_rabbitmq() {
        assert_eq!(format("", "a/b"), "/queue/a%2Fb");
        assert_eq!(format("amq.topic", "k"), "/topic/k");
        assert_eq!(format("x", ""), "/exchange/x");
        assert_eq!(format("x", "k%"), "/exchange/x/k%25");
    }
}
