//! TLS building blocks shared by the client listeners (gateway) and the
//! node protocol (docs/tls.md): PEM files → rustls configurations on the
//! `ring` provider, and the subject CN of a peer certificate.
//!
//! - [`load_certs`], [`load_key`], [`load_roots`]: PEM files, each error
//!   naming the file.
//! - [`server_config`]: a listener's configuration with the client
//!   certificate policy of RabbitMQ's `ssl_options` ([`ClientAuth`]).
//! - [`NodeTls`]: the node protocol's mutual TLS (both sides present a
//!   certificate signed by the cluster's CA).
//! - [`subject_cn`]: the common name of a DER certificate (a small DER
//!   walker: EXTERNAL logins need nothing else from X.509).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

/// Why a TLS setup could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} file {path}: {reason}")]
    Read { what: &'static str, path: PathBuf, reason: String },
    #[error("{what} file {path} holds no PEM certificate")]
    NoCertificate { what: &'static str, path: PathBuf },
    #[error("invalid TLS setup ({context}): {reason}")]
    Setup { context: String, reason: String },
}

/// The crypto provider every config uses (ring; never aws-lc-rs).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificates of a PEM file (a chain: leaf first). `what` names the
/// setting in errors (for example "tls_cert").
pub fn load_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read_err = |reason: String| TlsError::Read { what, path: path.to_path_buf(), reason };
    // Read the file ourselves first so that "not found" reads as such.
    let bytes = std::fs::read(path).map_err(|e| read_err(e.to_string()))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| read_err(format!("bad PEM: {e}")))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { what, path: path.to_path_buf() });
    }
    Ok(certs)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(what: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let read_err = |reason: String| TlsError::Read { what, path: path.to_path_buf(), reason };
    let bytes = std::fs::read(path).map_err(|e| read_err(e.to_string()))?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| read_err(format!("no usable PEM private key: {e}")))
}

/// The trust anchors of a CA PEM file.
pub fn load_roots(what: &'static str, path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(what, path)? {
        roots.add(cert).map_err(|e| TlsError::Read {
            what,
            path: path.to_path_buf(),
            reason: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(Arc::new(roots))
}

/// Which client certificates a listener asks for (RabbitMQ's
/// `ssl_options.verify` and `fail_if_no_peer_cert`).
#[derive(Clone, Debug)]
pub enum ClientAuth {
    /// `verify_none`: no certificate requested.
    None,
    /// `verify_peer`: a certificate is requested and, if sent, must chain
    /// to `ca`; `required` (`fail_if_no_peer_cert`) refuses clients
    /// without one.
    Verify { ca: PathBuf, ca_key: &'static str, required: bool },
}

/// A listener's configuration: the certificate chain and key, and the
/// client-certificate policy.
pub fn server_config(
    cert: (&'static str, &Path),
    key: (&'static str, &Path),
    client_auth: &ClientAuth,
) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = load_certs(cert.0, cert.1)?;
    let key_der = load_key(key.0, key.1)?;
    let setup = |e: &dyn std::fmt::Display| TlsError::Setup {
        context: format!("{} and {}", cert.1.display(), key.1.display()),
        reason: e.to_string(),
    };
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| setup(&e))?;
    let builder = match client_auth {
        ClientAuth::None => builder.with_no_client_auth(),
        ClientAuth::Verify { ca, ca_key, required } => {
            let roots = load_roots(ca_key, ca)?;
            let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider());
            let verifier = if *required { verifier } else { verifier.allow_unauthenticated() };
            let verifier = verifier.build().map_err(|e| TlsError::Setup {
                context: format!("CA {}", ca.display()),
                reason: e.to_string(),
            })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder.with_single_cert(chain, key_der).map_err(|e| setup(&e))?;
    Ok(Arc::new(config))
}

/// The node protocol's TLS: every process presents its certificate and
/// verifies the peer's against the cluster CA (mutual TLS). The HMAC
/// handshake of the cluster secret still runs inside.
#[derive(Clone)]
pub struct NodeTls {
    pub server: Arc<ServerConfig>,
    pub client: Arc<ClientConfig>,
}

impl std::fmt::Debug for NodeTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeTls(..)")
    }
}

/// The file settings of the node protocol's TLS.
#[derive(Clone, Debug)]
pub struct NodeTlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl NodeTls {
    /// Loads the files (named in errors by their config keys
    /// `cluster_tls_cert`, `cluster_tls_key`, `cluster_tls_ca`).
    pub fn load(files: &NodeTlsFiles) -> Result<NodeTls, TlsError> {
        let server = server_config(
            ("cluster_tls_cert", &files.cert),
            ("cluster_tls_key", &files.key),
            &ClientAuth::Verify { ca: files.ca.clone(), ca_key: "cluster_tls_ca", required: true },
        )?;
        let roots = load_roots("cluster_tls_ca", &files.ca)?;
        let chain = load_certs("cluster_tls_cert", &files.cert)?;
        let key = load_key("cluster_tls_key", &files.key)?;
        let setup = |e: &dyn std::fmt::Display| TlsError::Setup {
            context: format!("{}", files.cert.display()),
            reason: e.to_string(),
        };
        let inner = WebPkiServerVerifier::builder_with_provider(roots, provider()).build().map_err(|e| setup(&e))?;
        let client = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| setup(&e))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ClusterCaVerifier(inner)))
            .with_client_auth_cert(chain, key)
            .map_err(|e| setup(&e))?;
        Ok(NodeTls { server, client: Arc::new(client) })
    }
}

/// Verifies a node's certificate chain against the cluster CA (validity,
/// signatures, key usage) but not its names: nodes are reached by
/// whatever address they advertise, and the cluster CA, like the cluster
/// secret, is what makes a process a member.
#[derive(Debug)]
struct ClusterCaVerifier(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ClusterCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// The subject common name (OID 2.5.4.3) of a DER certificate; the last
/// one if there are several (the most specific, as RabbitMQ picks it).
/// `None` if the certificate has none or cannot be walked.
pub fn subject_cn(der: &[u8]) -> Option<String> {
    // Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signature }
    let (tag, cert, _) = tlv(der)?;
    if tag != 0x30 {
        return None;
    }
    let (tag, mut tbs, _) = tlv(cert)?;
    if tag != 0x30 {
        return None;
    }
    // TBSCertificate ::= SEQUENCE { [0] version OPTIONAL, serialNumber,
    //   signature, issuer, validity, subject, ... }
    let mut fields = Vec::with_capacity(6);
    while fields.len() < 6 && !tbs.is_empty() {
        let (tag, value, rest) = tlv(tbs)?;
        if !(fields.is_empty() && tag == 0xa0) {
            fields.push((tag, value));
        }
        tbs = rest;
    }
    let &(tag, mut name) = fields.get(4)?;
    if tag != 0x30 {
        return None;
    }
    // Name ::= SEQUENCE OF RelativeDistinguishedName (SET OF
    //   AttributeTypeAndValue ::= SEQUENCE { type OID, value ANY })
    const CN: &[u8] = &[0x55, 0x04, 0x03];
    let mut found = None;
    while !name.is_empty() {
        let (tag, mut rdn, rest) = tlv(name)?;
        name = rest;
        if tag != 0x31 {
            return None;
        }
        while !rdn.is_empty() {
            let (tag, atv, rest) = tlv(rdn)?;
            rdn = rest;
            if tag != 0x30 {
                return None;
            }
            let (oid_tag, oid, value) = tlv(atv)?;
            if oid_tag == 0x06 && oid == CN {
                let (vtag, v, _) = tlv(value)?;
                found = Some(match vtag {
                    // UTF8String, PrintableString, IA5String, TeletexString (as Latin-1)
                    0x0c | 0x13 | 0x16 => String::from_utf8(v.to_vec()).ok()?,
                    0x14 => v.iter().map(|&b| char::from(b)).collect(),
                    // BMPString: UTF-16BE
                    0x1e => {
                        let units: Vec<u16> =
                            v.chunks(2).map(|c| u16::from_be_bytes([c.first().copied().unwrap_or(0), c.get(1).copied().unwrap_or(0)])).collect();
                        String::from_utf16(&units).ok()?
                    }
                    _ => return None,
                });
            }
        }
    }
    found
}

/// One DER tag-length-value: (tag, value, the bytes after it). Single-byte
/// tags and definite lengths only (all DER has).
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let bytes = rest.get(..n)?;
        let len = bytes.iter().fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, rest.get(n..)?)
    };
    let value = rest.get(..len)?;
    Some((tag, value, rest.get(len..)?))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic
mod tests {
    use rcgen::{BasicConstraints, CertificateParams, DnType, DnValue, IsCa, Issuer, KeyPair, KeyUsagePurpose};

    use super::*;
    use crate::rpc::{self, Client, Handler, PeerInfo, Secret};

    fn leaf(cn: Option<DnValue>, issuer: &Issuer<'_, KeyPair>) -> (rcgen::Certificate, KeyPair) {
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::OrganizationName, "o");
        if let Some(cn) = cn {
            params.distinguished_name.push(DnType::CommonName, cn);
        }
        let key = KeyPair::generate().unwrap();
        (params.signed_by(&key, issuer).unwrap(), key)
    }

    fn ca() -> (rcgen::Certificate, Issuer<'static, KeyPair>) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, "test CA");
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let cert = params.self_signed(&key).unwrap();
        (cert, Issuer::new(params, key))
    }

    #[test]
    fn subject_cn_reads_every_string_type() {
        let (_, issuer) = ca();
        let cases = [
            (DnValue::Utf8String("alice".into()), "alice"),
            (DnValue::PrintableString("bob".try_into().unwrap()), "bob"),
            (DnValue::Ia5String("carol".try_into().unwrap()), "carol"),
            (DnValue::BmpString("dörte".try_into().unwrap()), "dörte"),
        ];
        for (value, want) in cases {
            let (cert, _) = leaf(Some(value), &issuer);
            assert_eq!(subject_cn(cert.der()).as_deref(), Some(want));
        }
        let (cert, _) = leaf(None, &issuer);
        assert_eq!(subject_cn(cert.der()), None);
        // Garbage and truncations never panic.
        let (cert, _) = leaf(Some(DnValue::Utf8String("x".into())), &issuer);
        for n in 0..cert.der().len() {
            let _ = subject_cn(&cert.der()[..n]);
        }
        assert_eq!(subject_cn(b"\x30\x84\xff\xff\xff\xff"), None);
    }

    /// Writes a node certificate set into `dir`: (cert, key, ca) files.
    fn node_files(dir: &Path, name: &str, ca: &rcgen::Certificate, issuer: &Issuer<'_, KeyPair>) -> NodeTlsFiles {
        let (cert, key) = leaf(Some(DnValue::Utf8String(name.into())), issuer);
        let files = NodeTlsFiles {
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
            ca: dir.join(format!("{name}-ca.pem")),
        };
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        std::fs::write(&files.ca, ca.pem()).unwrap();
        files
    }

    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct Text(String);
    impl rpc::Versioned for Text {}

    struct Echo;
    impl Handler<Text, Text> for Echo {
        async fn handle(&self, conn: &Client<Text, Text>, req: Text) -> Text {
            Text(format!("{} from {}", req.0, conn.peer().node_id))
        }
    }

    #[tokio::test]
    async fn node_protocol_over_mutual_tls() {
        let dir = tempfile::tempdir().unwrap();
        let (ca_cert, issuer) = ca();
        let server = NodeTls::load(&node_files(dir.path(), "n1", &ca_cert, &issuer)).unwrap();
        let client = NodeTls::load(&node_files(dir.path(), "g1", &ca_cert, &issuer)).unwrap();
        let (other_ca, other_issuer) = ca();
        let stranger = NodeTls::load(&node_files(dir.path(), "x", &other_ca, &other_issuer)).unwrap();
        let secret = Secret::new(*b"a test secret, 32 bytes long....").unwrap();

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let serving = tokio::spawn(rpc::serve(listener, secret.clone().with_tls(server), PeerInfo::node("n1"), Echo));

        let (c, _in) = rpc::connect::<Text, Text>(addr, &secret.clone().with_tls(client), PeerInfo::gateway("g1")).await.unwrap();
        assert_eq!(c.call(Text("hi".into())).await.unwrap(), Text("hi from g1".into()));
        // Right secret, no TLS: the server's TLS layer drops it.
        assert!(rpc::connect::<Text, Text>(addr, &secret, PeerInfo::gateway("g2")).await.is_err());
        // A certificate of another CA: refused both ways.
        assert!(rpc::connect::<Text, Text>(addr, &secret.clone().with_tls(stranger), PeerInfo::gateway("g3")).await.is_err());
        // The first connection is unharmed.
        assert_eq!(c.call(Text("again".into())).await.unwrap(), Text("again from g1".into()));
        serving.abort();
    }

    #[test]
    fn pem_errors_name_the_setting_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let e = load_certs("tls_cert", &missing).unwrap_err().to_string();
        assert!(e.contains("tls_cert") && e.contains("missing.pem"), "{e}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let e = load_certs("tls_ca", &empty).unwrap_err().to_string();
        assert!(e.contains("tls_ca") && e.contains("empty.pem") && e.contains("no PEM certificate"), "{e}");
        let e = load_key("tls_key", &empty).unwrap_err().to_string();
        assert!(e.contains("tls_key") && e.contains("empty.pem"), "{e}");
    }
}
