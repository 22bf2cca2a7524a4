//! Trusted reverse proxies: which peers may name the client, and how they name it (PROXY
//! protocol v1/v2 header before the request, or `X-Forwarded-For`).

use std::net::{IpAddr, SocketAddr};

use crate::protection::access::IpList;

/// The `[proxy]` settings in the form the shards use.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies {
    nets: IpList,
    /// Trusted peers begin with a PROXY protocol header.
    pub proxy_protocol: bool,
}

/// What the start of a trusted proxy's stream says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyHeader {
    /// Not all of the header has arrived.
    Incomplete,
    /// A header of `len` bytes naming the client, or `None` for a proxy's own connection
    /// (`LOCAL`, `UNKNOWN`, or a non-TCP family): the proxy's address stands.
    Complete {
        /// Header length.
        len: usize,
        /// The client.
        client: Option<SocketAddr>,
    },
    /// Not a PROXY header.
    Invalid(String),
}

impl TrustedProxies {
    /// From `[proxy]`.
    ///
    /// # Errors
    /// A bad entry, as `(trusted[i], reason)`.
    pub fn new(trusted: &[String], proxy_protocol: bool) -> Result<Self, (String, String)> {
        let nets = IpList::parse(trusted, &[])
            .map_err(|(key, reason)| (key.replacen("allow", "trusted", 1), reason))?;
        Ok(Self {
            nets,
            proxy_protocol,
        })
    }

    /// Whether any proxy is trusted.
    pub fn any(&self) -> bool {
        !self.nets.is_empty()
    }

    /// Whether `ip` is a trusted proxy.
    pub fn trusts(&self, ip: IpAddr) -> bool {
        self.any() && self.nets.permits(ip)
    }

    /// The client named by `X-Forwarded-For` values (every header's, in order): the right-most
    /// address that is not a trusted proxy, or the left-most if all are. `None` when the walk
    /// meets an entry that does not parse before finding the client (nothing to its left can
    /// be trusted, and the client is unknown): the caller refuses the request.
    pub fn forwarded_client(&self, values: &str) -> Option<IpAddr> {
        let mut last = None;
        for entry in values.rsplit(',').map(str::trim) {
            let ip = parse_forwarded(entry)?;
            if !self.trusts(ip) {
                return Some(ip);
            }
            last = Some(ip);
        }
        last
    }
}

/// One `X-Forwarded-For` entry: an address, optionally with a port (`1.2.3.4:5`, `[::1]:5`).
fn parse_forwarded(entry: &str) -> Option<IpAddr> {
    entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|s| s.ip()))
}

/// Parses a PROXY protocol header (v2 binary or v1 text) at the start of `buf`.
pub fn parse_header(buf: &[u8]) -> ProxyHeader {
    use ppp::{HeaderResult, PartialResult};
    let parsed = HeaderResult::parse(buf);
    if parsed.is_incomplete() {
        return ProxyHeader::Incomplete;
    }
    match parsed {
        HeaderResult::V2(Ok(h)) => {
            // Only a proxied TCP stream names a client; LOCAL, UDP and UNIX leave the proxy's.
            let stream = h.protocol == ppp::v2::Protocol::Stream;
            let client = match (h.command, h.addresses) {
                _ if !stream => None,
                (ppp::v2::Command::Proxy, ppp::v2::Addresses::IPv4(a)) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                (ppp::v2::Command::Proxy, ppp::v2::Addresses::IPv6(a)) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                _ => None,
            };
            ProxyHeader::Complete {
                len: h.len(),
                client,
            }
        }
        HeaderResult::V1(Ok(h)) => {
            let client = match h.addresses {
                ppp::v1::Addresses::Tcp4(a) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                ppp::v1::Addresses::Tcp6(a) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                ppp::v1::Addresses::Unknown => None,
            };
            ProxyHeader::Complete {
                len: h.header.len(),
                client,
            }
        }
        HeaderResult::V2(Err(e)) => ProxyHeader::Invalid(format!("invalid PROXY header: {e}")),
        HeaderResult::V1(Err(e)) => ProxyHeader::Invalid(format!("invalid PROXY header: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxies(nets: &[&str]) -> TrustedProxies {
        let v: Vec<String> = nets.iter().map(|s| s.to_string()).collect();
        TrustedProxies::new(&v, false).unwrap()
    }

    #[test]
    fn forwarded_for_takes_the_right_most_untrusted_entry() {
        let p = proxies(&["10.0.0.0/8"]);
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        assert_eq!(p.forwarded_client("203.0.113.7"), ip("203.0.113.7"));
        // A client-supplied entry to the left of the real client is not believed.
        assert_eq!(
            p.forwarded_client("1.1.1.1, 203.0.113.7, 10.0.0.5"),
            ip("203.0.113.7")
        );
        assert_eq!(p.forwarded_client("10.0.0.9, 10.0.0.5"), ip("10.0.0.9"));
        assert_eq!(p.forwarded_client("[2001:db8::1]:443"), ip("2001:db8::1"));
        assert_eq!(p.forwarded_client("198.51.100.1:5000"), ip("198.51.100.1"));
        assert_eq!(p.forwarded_client("garbage"), None);
        assert_eq!(p.forwarded_client("1.1.1.1, garbage, 10.0.0.5"), None);
        assert_eq!(p.forwarded_client(""), None);
    }

    #[test]
    fn trusts_only_listed_networks() {
        let p = proxies(&["10.0.0.0/8", "::1"]);
        assert!(p.trusts("10.2.3.4".parse().unwrap()));
        assert!(p.trusts("::1".parse().unwrap()));
        assert!(!p.trusts("127.0.0.1".parse().unwrap()));
        assert!(!TrustedProxies::default().trusts("10.2.3.4".parse().unwrap()));
    }

    #[test]
    fn proxy_v1_and_v2_headers() {
        let v1 = b"PROXY TCP4 192.0.2.1 198.51.100.2 5000 443\r\nGET / HTTP/1.1\r\n";
        assert_eq!(
            parse_header(v1),
            ProxyHeader::Complete {
                len: 44,
                client: Some("192.0.2.1:5000".parse().unwrap())
            }
        );
        assert_eq!(parse_header(&v1[..20]), ProxyHeader::Incomplete);
        assert_eq!(
            parse_header(b"PROXY UNKNOWN\r\n"),
            ProxyHeader::Complete {
                len: 15,
                client: None
            }
        );
        assert!(matches!(
            parse_header(b"GET /ws/shop HTTP/1.1\r\n"),
            ProxyHeader::Invalid(_)
        ));
        let v2 = ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            (
                "[2001:db8::7]:6000".parse::<SocketAddr>().unwrap(),
                "[2001:db8::1]:443".parse::<SocketAddr>().unwrap(),
            ),
        )
        .build()
        .unwrap();
        let mut buf = v2.clone();
        buf.extend_from_slice(b"GET /");
        assert_eq!(
            parse_header(&buf),
            ProxyHeader::Complete {
                len: v2.len(),
                client: Some("[2001:db8::7]:6000".parse().unwrap())
            }
        );
        assert_eq!(parse_header(&v2[..10]), ProxyHeader::Incomplete);
        let udp = ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Datagram,
            (
                "192.0.2.9:53".parse::<SocketAddr>().unwrap(),
                "192.0.2.1:53".parse::<SocketAddr>().unwrap(),
            ),
        )
        .build()
        .unwrap();
        assert_eq!(
            parse_header(&udp),
            ProxyHeader::Complete {
                len: udp.len(),
                client: None
            }
        );
    }
}
