//! SASL authentication: PLAIN and AMQPLAIN against the user table, and
//! EXTERNAL (the subject CN of a verified TLS client certificate, as
//! RabbitMQ's rabbitmq_auth_mechanism_ssl) on connections that have one.
//! Users and password hashes are the replicated metadata's
//! (`sluice_cluster::meta::auth`), read through the router's copy.

use bytes::{BufMut, BytesMut};
use sluice_codecs::amqp::FieldTable;

use crate::router::Router;

/// Who is on the other end of a connection, as far as logins care.
#[derive(Clone, Debug, Default)]
pub struct Peer {
    /// The subject CN of the client's verified TLS certificate (EXTERNAL,
    /// STOMP certificate logins).
    pub cert_user: Option<String>,
    /// The peer address is a loopback one (127.0.0.0/8, ::1): users in
    /// `loopback_users` may only log in from such an address.
    pub loopback: bool,
    /// The peer's address (audit events).
    pub addr: String,
}

/// Why a login failed.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("unknown authentication mechanism '{0}'")]
    UnknownMechanism(String),
    #[error("malformed {0} response")]
    Malformed(&'static str),
    #[error("user '{0}' - invalid credentials")]
    BadCredentials(String),
    #[error("user '{0}' (the client certificate's CN) does not exist")]
    UnknownCertUser(String),
    #[error("user '{0}' can only connect via localhost")]
    LoopbackOnly(String),
}

/// RabbitMQ's `loopback_users`: refuses `user` unless the peer is on a
/// loopback address.
impl AuthError {
    /// The user name the failed login gave, if any.
    pub fn user(&self) -> Option<&str> {
        match self {
            AuthError::BadCredentials(u) | AuthError::UnknownCertUser(u) | AuthError::LoopbackOnly(u) => Some(u),
            AuthError::UnknownMechanism(_) | AuthError::Malformed(_) => None,
        }
    }
}

pub fn check_loopback(user: String, loopback_users: &[String], peer: &Peer) -> Result<String, AuthError> {
    if !peer.loopback && loopback_users.contains(&user) {
        return Err(AuthError::LoopbackOnly(user));
    }
    Ok(user)
}

/// The mechanisms offered in connection.start: EXTERNAL only when the
/// connection has a verified client certificate.
pub fn mechanisms(cert_user: Option<&str>) -> &'static [u8] {
    match cert_user {
        Some(_) => b"PLAIN AMQPLAIN EXTERNAL",
        None => b"PLAIN AMQPLAIN",
    }
}

/// Checks a SASL response; returns the user name. `cert_user` is the
/// subject CN of the connection's verified client certificate: EXTERNAL
/// logs in as that user (it must exist; the response is ignored, as
/// RabbitMQ does), and is an unknown mechanism without one.
pub fn authenticate(
    users: &Router,
    mechanism: &str,
    response: &[u8],
    cert_user: Option<&str>,
) -> Result<String, AuthError> {
    let (user, pass) = match mechanism {
        "EXTERNAL" => {
            let Some(user) = cert_user else {
                return Err(AuthError::UnknownMechanism(mechanism.to_string()));
            };
            return if users.user_exists(user) {
                Ok(user.to_string())
            } else {
                Err(AuthError::UnknownCertUser(user.to_string()))
            };
        }
        "PLAIN" => {
            // [authzid] NUL authcid NUL passwd
            let mut parts = response.split(|b| *b == 0);
            let _authzid = parts.next();
            let user = parts.next().ok_or(AuthError::Malformed("PLAIN"))?;
            let pass = parts.next().ok_or(AuthError::Malformed("PLAIN"))?;
            if parts.next().is_some() {
                return Err(AuthError::Malformed("PLAIN"));
            }
            (
                String::from_utf8(user.to_vec()).map_err(|_| AuthError::Malformed("PLAIN"))?,
                String::from_utf8(pass.to_vec()).map_err(|_| AuthError::Malformed("PLAIN"))?,
            )
        }
        "AMQPLAIN" => {
            // A field table without its length prefix.
            let mut buf = BytesMut::with_capacity(response.len() + 4);
            buf.put_u32(response.len() as u32);
            buf.put_slice(response);
            let table = FieldTable::decode(&buf).map_err(|_| AuthError::Malformed("AMQPLAIN"))?;
            let user = table.get("LOGIN").and_then(|v| v.as_str()).ok_or(AuthError::Malformed("AMQPLAIN"))?;
            let pass = table.get("PASSWORD").and_then(|v| v.as_str()).ok_or(AuthError::Malformed("AMQPLAIN"))?;
            (user.to_string(), pass.to_string())
        }
        other => return Err(AuthError::UnknownMechanism(other.to_string())),
    };
    if users.check_password(&user, &pass) {
        Ok(user)
    } else {
        Err(AuthError::BadCredentials(user))
    }
}
