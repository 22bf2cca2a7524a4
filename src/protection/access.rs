//! IP access lists: CIDR allow and deny lists (IPv4 and IPv6), global (`[access]`) and per
//! project (`allow_ips`/`deny_ips`). Deny wins; a non-empty allow list admits only its
//! networks. IPv4-mapped IPv6 peers (`::ffff:a.b.c.d`) are checked as their IPv4 address.

use std::net::IpAddr;

use ipnet::IpNet;

/// A parsed allow/deny pair.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IpList {
    allow: Box<[IpNet]>,
    deny: Box<[IpNet]>,
}

/// Parses one entry: a CIDR (`10.0.0.0/8`, `2001:db8::/32`) or a bare address (a /32 or /128).
///
/// # Errors
/// The entry is neither.
pub fn parse_net(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    if let Ok(n) = s.parse::<IpNet>() {
        return Ok(n.trunc());
    }
    s.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("`{s}` is not an IP address or CIDR network"))
}

impl IpList {
    /// Parses both lists; errors name the entry's position (`allow[2]`).
    ///
    /// # Errors
    /// `(list name and index, reason)` of the first bad entry.
    pub fn parse(allow: &[String], deny: &[String]) -> Result<Self, (String, String)> {
        let one = |name: &str, list: &[String]| -> Result<Box<[IpNet]>, (String, String)> {
            list.iter()
                .enumerate()
                .map(|(i, s)| parse_net(s).map_err(|e| (format!("{name}[{i}]"), e)))
                .collect()
        };
        Ok(Self {
            allow: one("allow", allow)?,
            deny: one("deny", deny)?,
        })
    }

    /// Both lists empty: everyone is admitted (and the check costs nothing).
    pub fn is_empty(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty()
    }

    /// Whether `ip` may connect.
    pub fn permits(&self, ip: IpAddr) -> bool {
        if self.is_empty() {
            return true;
        }
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        if self.deny.iter().any(|n| n.contains(&ip)) {
            return false;
        }
        self.allow.is_empty() || self.allow.iter().any(|n| n.contains(&ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(allow: &[&str], deny: &[&str]) -> IpList {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        IpList::parse(&v(allow), &v(deny)).unwrap()
    }

    #[test]
    fn ipv6_cidrs_parse_and_match() {
        let l = list(&["2001:db8::/32", "::1"], &["2001:db8:dead::/48"]);
        assert!(l.permits("2001:db8:1::5".parse().unwrap()));
        assert!(l.permits("::1".parse().unwrap()));
        assert!(!l.permits("2001:db8:dead::1".parse().unwrap()));
        assert!(!l.permits("2001:db9::1".parse().unwrap()));
        assert!(!l.permits("127.0.0.1".parse().unwrap()));
        // Host bits are ignored, like a router would.
        assert_eq!(parse_net("fe80::1/10").unwrap().to_string(), "fe80::/10");
        assert!(parse_net("2001:db8::/129").is_err());
        assert!(parse_net("not-an-ip").is_err());
    }

    #[test]
    fn deny_wins_and_empty_allow_admits_all() {
        let l = list(&["10.0.0.0/8"], &["10.1.0.0/16"]);
        assert!(l.permits("10.2.3.4".parse().unwrap()));
        assert!(!l.permits("10.1.3.4".parse().unwrap()));
        assert!(!l.permits("192.168.0.1".parse().unwrap()));
        let d = list(&[], &["192.168.0.0/24"]);
        assert!(d.permits("8.8.8.8".parse().unwrap()));
        assert!(!d.permits("192.168.0.7".parse().unwrap()));
        assert!(IpList::default().permits("1.2.3.4".parse().unwrap()));
    }

    #[test]
    fn ipv4_mapped_peers_match_ipv4_entries() {
        let l = list(&[], &["127.0.0.2/32"]);
        assert!(!l.permits("::ffff:127.0.0.2".parse().unwrap()));
        assert!(l.permits("::ffff:127.0.0.1".parse().unwrap()));
    }
}
