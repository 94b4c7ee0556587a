//! Who a peer's certificate names.
//!
//! The certificate has already been verified against the CA by the
//! handshake; this only reads names out of it. A node's certificate has the
//! common name [`crate::NODE_COMMON_NAME`] and lists the hosts it serves
//! on (DNS names or IP addresses) as subject alternative names; a client's
//! common name is its identity's name (docs/security.md).

use std::net::IpAddr;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The names in a verified peer certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCert {
    /// The subject's common name, if it has one.
    pub common_name: Option<String>,
    /// DNS subject alternative names.
    pub dns_names: Vec<String>,
    /// IP address subject alternative names.
    pub ips: Vec<IpAddr>,
}

impl PeerCert {
    /// Reads the names from a DER certificate.
    pub fn parse(der: &[u8]) -> Result<PeerCert, String> {
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| format!("not an X.509 certificate: {e}"))?;
        let common_name = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_string);
        let mut dns_names = Vec::new();
        let mut ips = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(d) => dns_names.push(d.to_ascii_lowercase()),
                    GeneralName::IPAddress(b) => {
                        if let Ok(a) = <[u8; 4]>::try_from(*b) {
                            ips.push(IpAddr::from(a));
                        } else if let Ok(a) = <[u8; 16]>::try_from(*b) {
                            ips.push(IpAddr::from(a));
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(PeerCert {
            common_name,
            dns_names,
            ips,
        })
    }

    /// The verified leaf certificate a request's connection presented, if
    /// any (TLS connections only).
    pub fn of_request<T>(req: &tonic::Request<T>) -> Option<Result<PeerCert, String>> {
        let certs = req.peer_certs()?;
        let leaf = certs.first()?;
        Some(PeerCert::parse(leaf.as_ref()))
    }

    /// Whether this is a node's certificate.
    pub fn is_node(&self) -> bool {
        self.common_name.as_deref() == Some(crate::NODE_COMMON_NAME)
    }

    /// Whether the certificate names `host` (an IP address, or a DNS name
    /// compared without case; no wildcards).
    pub fn names_host(&self, host: &str) -> bool {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        match host.parse::<IpAddr>() {
            Ok(ip) => self.ips.contains(&ip),
            Err(_) => self.dns_names.iter().any(|d| d.eq_ignore_ascii_case(host)),
        }
    }
}

/// The host of `host:port` (`[v6]:port` too), or the whole of it when it
/// has no port.
pub fn host_of(addr: &str) -> &str {
    let addr = crate::client::strip_scheme(addr);
    if let Some(rest) = addr.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match addr.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') && p.chars().all(|c| c.is_ascii_digit()) => h,
        _ => addr,
    }
}
