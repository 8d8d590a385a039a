//! The WebSocket opening handshake (RFC 6455 §4.2): the HTTP/1.1 request
//! head, its checks, and the `101 Switching Protocols` answer.

/// GUID appended to the client's key (RFC 6455 §1.3).
pub const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Most headers accepted in a request head.
const MAX_HEADERS: usize = 64;

/// An HTTP request head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The request target without its query string.
    pub path: String,
    pub version: String,
    /// In order; names as sent.
    pub headers: Vec<(String, String)>,
}

impl Request {
    /// First header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// Comma-separated tokens of every header called `name`, trimmed.
    pub fn tokens(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .flat_map(|(_, v)| v.split(','))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .collect()
    }
}

/// What a valid upgrade request asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upgrade {
    /// `Sec-WebSocket-Key`.
    pub key: String,
    /// `Sec-WebSocket-Protocol` offers, in the client's order.
    pub protocols: Vec<String>,
}

/// Why a handshake fails; [`HandshakeError::status`] is the HTTP answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    #[error("request head larger than {0} bytes")]
    TooLarge(usize),
    #[error("more than {MAX_HEADERS} headers")]
    TooManyHeaders,
    #[error("malformed request line")]
    BadRequestLine,
    #[error("malformed header line")]
    BadHeader,
    #[error("request head is not ASCII/UTF-8")]
    NotText,
    #[error("method {0} is not GET")]
    Method(String),
    #[error("HTTP version {0} is not HTTP/1.1")]
    Version(String),
    #[error("missing or wrong header {0}")]
    MissingHeader(&'static str),
    #[error("Sec-WebSocket-Version is not 13")]
    WebSocketVersion,
    #[error("Sec-WebSocket-Key is not 16 bytes in base64")]
    BadKey,
}

impl HandshakeError {
    /// The HTTP status to answer with.
    pub fn status(&self) -> u16 {
        match self {
            HandshakeError::TooLarge(_) | HandshakeError::TooManyHeaders => 431,
            HandshakeError::Method(_) => 405,
            HandshakeError::WebSocketVersion => 426,
            _ => 400,
        }
    }
}

/// Parses the request head at the front of `buf`: `Ok(None)` until the
/// blank line has arrived, else the request and the length of its head
/// (bytes after it belong to the WebSocket). More than `max` bytes
/// without a blank line is an error.
pub fn parse_request(buf: &[u8], max: usize) -> Result<Option<(Request, usize)>, HandshakeError> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        if buf.len() > max {
            return Err(HandshakeError::TooLarge(max));
        }
        return Ok(None);
    };
    if end + 4 > max {
        return Err(HandshakeError::TooLarge(max));
    }
    let head = std::str::from_utf8(&buf[..end]).map_err(|_| HandshakeError::NotText)?;
    let mut lines = head.split("\r\n");
    let line = lines.next().unwrap_or_default();
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(HandshakeError::BadRequestLine);
    };
    if method.is_empty() || target.is_empty() || !version.starts_with("HTTP/") {
        return Err(HandshakeError::BadRequestLine);
    }
    let path = target.split(['?', '#']).next().unwrap_or_default().to_string();
    let mut headers = Vec::new();
    for l in lines {
        if headers.len() == MAX_HEADERS {
            return Err(HandshakeError::TooManyHeaders);
        }
        let (name, value) = l.split_once(':').ok_or(HandshakeError::BadHeader)?;
        if name.is_empty() || name.contains([' ', '\t']) {
            return Err(HandshakeError::BadHeader);
        }
        headers.push((name.to_string(), value.trim().to_string()));
    }
    let req = Request { method: method.to_string(), path, version: version.to_string(), headers };
    Ok(Some((req, end + 4)))
}

/// The checks of RFC 6455 §4.2.1 (the path is the caller's business).
pub fn check_upgrade(req: &Request) -> Result<Upgrade, HandshakeError> {
    if req.method != "GET" {
        return Err(HandshakeError::Method(req.method.clone()));
    }
    if req.version != "HTTP/1.1" {
        return Err(HandshakeError::Version(req.version.clone()));
    }
    if req.header("host").is_none() {
        return Err(HandshakeError::MissingHeader("Host"));
    }
    if !req.tokens("upgrade").iter().any(|t| t.eq_ignore_ascii_case("websocket")) {
        return Err(HandshakeError::MissingHeader("Upgrade"));
    }
    if !req.tokens("connection").iter().any(|t| t.eq_ignore_ascii_case("upgrade")) {
        return Err(HandshakeError::MissingHeader("Connection"));
    }
    if req.header("sec-websocket-version") != Some("13") {
        return Err(HandshakeError::WebSocketVersion);
    }
    let key = req.header("sec-websocket-key").ok_or(HandshakeError::MissingHeader("Sec-WebSocket-Key"))?;
    if base64_decoded_len(key) != Some(16) {
        return Err(HandshakeError::BadKey);
    }
    let protocols = req.tokens("sec-websocket-protocol").into_iter().map(str::to_string).collect();
    Ok(Upgrade { key: key.to_string(), protocols })
}

/// The `101 Switching Protocols` answer, with the chosen subprotocol.
pub fn response_101(key: &str, protocol: Option<&str>) -> String {
    let mut r = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n",
        accept_key(key)
    );
    if let Some(p) = protocol {
        r.push_str(&format!("Sec-WebSocket-Protocol: {p}\r\n"));
    }
    r.push_str("\r\n");
    r
}

/// A plain-text error answer that closes the connection.
pub fn response_error(status: u16, body: &str) -> String {
    let reason = match status {
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        _ => "Error",
    };
    let extra = if status == 426 { "Sec-WebSocket-Version: 13\r\n" } else { "" };
    format!(
        "HTTP/1.1 {status} {reason}\r\n{extra}Content-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// `Sec-WebSocket-Accept` for a client key: base64(SHA-1(key ‖ GUID)).
pub fn accept_key(key: &str) -> String {
    let mut input = key.as_bytes().to_vec();
    input.extend_from_slice(GUID.as_bytes());
    base64(&sha1(&input))
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding.
pub fn base64(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16) | (u32::from(*c.get(1).unwrap_or(&0)) << 8) | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(char::from(B64[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Length of what a padded standard base64 string decodes to, or `None`
/// if it is not one.
fn base64_decoded_len(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    if b.is_empty() || !b.len().is_multiple_of(4) {
        return None;
    }
    let pad = b.iter().rev().take_while(|&&c| c == b'=').count();
    if pad > 2 || !b[..b.len() - pad].iter().all(|c| B64.contains(c)) {
        return None;
    }
    Some(b.len() / 4 * 3 - pad)
}

/// SHA-1 (FIPS 180-4). Used only for the handshake, where RFC 6455
/// prescribes it; it protects nothing.
pub fn sha1(data: &[u8]) -> [u8; 20] {
    let mut h: [u32; 5] = [0x6745_2301, 0xEFCD_AB89, 0x98BA_DCFE, 0x1032_5476, 0xC3D2_E1F0];
    let mut msg = data.to_vec();
    let bits = (data.len() as u64).wrapping_mul(8);
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&bits.to_be_bytes());
    for block in msg.chunks_exact(64) {
        let mut w = [0u32; 80];
        for (i, word) in block.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = h;
        for (i, wi) in w.iter().enumerate() {
            let (f, k) = match i {
                0..=19 => ((b & c) | (!b & d), 0x5A82_7999),
                20..=39 => (b ^ c ^ d, 0x6ED9_EBA1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8F1B_BCDC),
                _ => (b ^ c ^ d, 0xCA62_C1D6),
            };
            let t = a.rotate_left(5).wrapping_add(f).wrapping_add(e).wrapping_add(k).wrapping_add(*wi);
            e = d;
            d = c;
            c = b.rotate_left(30);
            b = a;
            a = t;
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e]) {
            *x = x.wrapping_add(y);
        }
    }
    let mut out = [0u8; 20];
    for (i, x) in h.iter().enumerate() {
        out[i * 4..i * 4 + 4].copy_from_slice(&x.to_be_bytes());
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn sha1_and_base64_vectors() {
        assert_eq!(hex(&sha1(b"")), "da39a3ee5e6b4b0d3255bfef95601890afd80709");
        assert_eq!(hex(&sha1(b"abc")), "a9993e364706816aba3e25717850c26c9cd0d89d");
        assert_eq!(
            hex(&sha1(b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq")),
            "84983e441c3bd26ebaae4aa1f95129e5e54670f1"
        );
        assert_eq!(hex(&sha1(&[b'a'; 1000])), "291e9a6c66994949b57ba5e650361e98fc36b1ba");
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        // RFC 6455 §1.3.
        assert_eq!(accept_key("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    const GOOD: &str = "GET /ws?x=1 HTTP/1.1\r\nHost: localhost\r\nUpgrade: WebSocket\r\nConnection: keep-alive, Upgrade\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
        Sec-WebSocket-Protocol: v10.stomp, v11.stomp\r\nSec-WebSocket-Protocol: v12.stomp\r\n\r\nEXTRA";

    #[test]
    fn parses_and_checks_a_good_request() {
        let (req, n) = parse_request(GOOD.as_bytes(), 8192).unwrap().unwrap();
        assert_eq!(&GOOD[n..], "EXTRA");
        assert_eq!(req.path, "/ws");
        let up = check_upgrade(&req).unwrap();
        assert_eq!(up.protocols, ["v10.stomp", "v11.stomp", "v12.stomp"]);
        let r = response_101(&up.key, Some("v12.stomp"));
        assert!(r.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"), "{r}");
        assert!(r.ends_with("Sec-WebSocket-Protocol: v12.stomp\r\n\r\n"));
    }

    #[test]
    fn bad_requests() {
        assert_eq!(parse_request(&GOOD.as_bytes()[..40], 8192), Ok(None));
        assert_eq!(parse_request(GOOD.as_bytes(), 100), Err(HandshakeError::TooLarge(100)));
        assert_eq!(parse_request(&[b'a'; 200], 100), Err(HandshakeError::TooLarge(100)));
        assert_eq!(parse_request(b"GET /\r\n\r\n", 100), Err(HandshakeError::BadRequestLine));
        assert_eq!(parse_request(b"GET / HTTP/1.1\r\nnocolon\r\n\r\n", 100), Err(HandshakeError::BadHeader));
        let check = |text: String| check_upgrade(&parse_request(text.as_bytes(), 8192).unwrap().unwrap().0);
        assert_eq!(check(GOOD.replace("GET", "POST")).unwrap_err().status(), 405);
        assert_eq!(check(GOOD.replace("Upgrade: WebSocket", "Upgrade: h2c")).unwrap_err().status(), 400);
        assert_eq!(check(GOOD.replace("keep-alive, Upgrade", "close")).unwrap_err().status(), 400);
        assert_eq!(check(GOOD.replace("Version: 13", "Version: 8")).unwrap_err().status(), 426);
        assert_eq!(check(GOOD.replace("dGhlIHNhbXBsZSBub25jZQ==", "short")), Err(HandshakeError::BadKey));
        assert_eq!(check(GOOD.replace("HTTP/1.1", "HTTP/1.0")).unwrap_err().status(), 400);
        assert!(response_error(404, "no").starts_with("HTTP/1.1 404 Not Found\r\n"));
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600), max in 0usize..700) {
            if let Ok(Some((req, _))) = parse_request(&bytes, max) {
                let _ = check_upgrade(&req);
            }
        }

        #[test]
        fn base64_lengths(data in proptest::collection::vec(any::<u8>(), 0..50)) {
            let s = base64(&data);
            prop_assert_eq!(base64_decoded_len(&s).unwrap_or(0), data.len());
        }
    }
}
