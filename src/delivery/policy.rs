//! Where webhooks may send: the destination policy a cluster admin sets, checked when a
//! Webhook is applied (for addresses written in its URL) and again at connect time, after DNS,
//! for every address a connection is opened to (so that neither a name nor a later change of
//! its records leads elsewhere).
//!
//! Never reachable unless allowed explicitly: loopback, unspecified, link-local, multicast and
//! cloud metadata addresses, in every spelling (IPv4, IPv6, IPv4-mapped and -compatible, NAT64,
//! 6to4, Teredo). Never reachable at all: Herald's own listeners. On top, a cluster admin may
//! deny CIDRs and host names for all tenants or per namespace, and may allow them: when allow
//! rules apply to a namespace, its webhooks reach only what those rules allow.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, RwLock};

use ipnet::IpNet;

/// Host names of cloud metadata services.
const METADATA_HOSTS: &[&str] = &[
    "metadata.google.internal",
    "metadata.goog",
    "metadata",
    "metadata.azure.com",
    "instance-data",
    "instance-data.ec2.internal",
];

/// Cloud metadata and platform addresses outside the link-local range.
const METADATA_V4: &[Ipv4Addr] = &[
    // Alibaba Cloud.
    Ipv4Addr::new(100, 100, 100, 200),
    // Azure's WireServer (platform agent, DNS, health).
    Ipv4Addr::new(168, 63, 129, 16),
];

/// The EC2 metadata service over IPv6.
const METADATA_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);

/// What a rule matches: an address range or a host name (`*.example.com` for its subdomains).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Matcher {
    Net(IpNet),
    Host(String),
    Suffix(String),
}

impl Matcher {
    fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if let Ok(net) = text.parse::<IpNet>() {
            return Ok(Matcher::Net(net.trunc()));
        }
        if let Ok(ip) = text.parse::<IpAddr>() {
            return Ok(Matcher::Net(IpNet::from(ip)));
        }
        let name = text.trim_end_matches('.').to_ascii_lowercase();
        let valid = |n: &str| {
            !n.is_empty()
                && n.split('.').all(|label| {
                    !label.is_empty()
                        && label
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                })
        };
        match name.strip_prefix("*.") {
            Some(suffix) if valid(suffix) => Ok(Matcher::Suffix(format!(".{suffix}"))),
            None if valid(&name) => Ok(Matcher::Host(name)),
            _ => Err(format!(
                "{text:?} is neither a CIDR, an address nor a host name"
            )),
        }
    }

    fn matches_ip(&self, ip: IpAddr) -> bool {
        match self {
            Matcher::Net(net) => candidates(ip).any(|candidate| net.contains(&candidate)),
            _ => false,
        }
    }

    fn matches_host(&self, host: &str) -> bool {
        match self {
            Matcher::Host(name) => name == host,
            Matcher::Suffix(suffix) => host.ends_with(suffix.as_str()),
            Matcher::Net(_) => false,
        }
    }
}

/// One allow or deny rule, for one namespace or for all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DestinationRule {
    namespace: Option<String>,
    matcher: Matcher,
}

impl std::str::FromStr for DestinationRule {
    type Err = String;

    /// `[NAMESPACE=]CIDR|ADDRESS|HOST|*.DOMAIN`.
    fn from_str(text: &str) -> Result<Self, String> {
        let (namespace, target) = match text.split_once('=') {
            Some((namespace, target)) => (Some(namespace.trim().to_string()), target),
            None => (None, text),
        };
        if namespace.as_deref().is_some_and(str::is_empty) {
            return Err(format!("{text:?}: the namespace before '=' is empty"));
        }
        Ok(DestinationRule {
            namespace,
            matcher: Matcher::parse(target)?,
        })
    }
}

impl DestinationRule {
    fn applies_to(&self, namespace: &str) -> bool {
        self.namespace.as_deref().is_none_or(|n| n == namespace)
    }
}

/// The destination policy. Cheap to clone (shared).
#[derive(Clone, Debug, Default)]
pub struct DestinationPolicy(Arc<Rules>);

#[derive(Debug, Default)]
struct Rules {
    allow: Vec<DestinationRule>,
    deny: Vec<DestinationRule>,
    /// Loopback addresses (127.0.0.0/8, ::1) may be reached (`herald run`, tests).
    allow_loopback: bool,
    /// Herald's own listeners, never a destination (filled in as they are bound).
    own_listeners: RwLock<Vec<SocketAddr>>,
}

impl DestinationPolicy {
    /// A policy with these rules.
    pub fn new(
        allow: Vec<DestinationRule>,
        deny: Vec<DestinationRule>,
        allow_loopback: bool,
    ) -> Self {
        DestinationPolicy(Arc::new(Rules {
            allow,
            deny,
            allow_loopback,
            own_listeners: RwLock::default(),
        }))
    }

    /// The default policy with loopback allowed (`herald run` on a workstation, tests).
    pub fn allowing_loopback() -> Self {
        Self::new(Vec::new(), Vec::new(), true)
    }

    /// A number that tells this policy apart from any other alive at the same time.
    pub fn identity(&self) -> usize {
        Arc::as_ptr(&self.0) as usize
    }

    /// Records one of Herald's own listeners, which no webhook may reach.
    pub fn add_own_listener(&self, address: SocketAddr) {
        self.0
            .own_listeners
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(address);
    }

    /// Whether some rule names this namespace (its webhooks then get clients of their own).
    pub fn has_rules_for(&self, namespace: &str) -> bool {
        let names = |rules: &[DestinationRule]| {
            rules
                .iter()
                .any(|r| r.namespace.as_deref() == Some(namespace))
        };
        names(&self.0.allow) || names(&self.0.deny)
    }

    fn allow_rules<'a>(&'a self, namespace: &'a str) -> impl Iterator<Item = &'a DestinationRule> {
        self.0.allow.iter().filter(move |r| r.applies_to(namespace))
    }

    fn deny_rules<'a>(&'a self, namespace: &'a str) -> impl Iterator<Item = &'a DestinationRule> {
        self.0.deny.iter().filter(move |r| r.applies_to(namespace))
    }

    /// Why a host name (not an address) may not be used by a namespace's webhooks, if so.
    pub fn refuse_name(&self, namespace: &str, host: &str) -> Option<String> {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        if METADATA_HOSTS.contains(&host.as_str()) {
            return Some(format!("{host} is a cloud metadata service"));
        }
        if self
            .deny_rules(namespace)
            .any(|r| r.matcher.matches_host(&host))
        {
            return Some(format!("{host} is denied by the destination policy"));
        }
        None
    }

    /// Whether a host name passes the namespace's allow rules by name (when it has any).
    fn allowed_by_name(&self, namespace: &str, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.allow_rules(namespace)
            .any(|r| r.matcher.matches_host(&host))
    }

    /// Why an address may not be reached by a namespace's webhooks, if so. `host` is the name
    /// it was resolved from (allow rules may name hosts).
    pub fn refuse_address(
        &self,
        namespace: &str,
        host: Option<&str>,
        address: SocketAddr,
    ) -> Option<String> {
        let ip = address.ip();
        if self.is_own_listener(address) {
            return Some(format!("{address} is one of Herald's own listeners"));
        }
        if self.deny_rules(namespace).any(|r| r.matcher.matches_ip(ip)) {
            return Some(format!("{ip} is denied by the destination policy"));
        }
        let explicitly_allowed = self
            .allow_rules(namespace)
            .any(|r| r.matcher.matches_ip(ip));
        if let Some(why) = builtin_refusal(ip)
            && !explicitly_allowed
            && !(self.0.allow_loopback && is_loopback(ip))
        {
            return Some(format!("{ip} is {why}"));
        }
        let has_allow_rules = self.allow_rules(namespace).next().is_some();
        if has_allow_rules
            && !explicitly_allowed
            && !host.is_some_and(|h| self.allowed_by_name(namespace, h))
        {
            return Some(format!(
                "{ip} is not among the destinations the policy allows for namespace {namespace}"
            ));
        }
        None
    }

    fn is_own_listener(&self, address: SocketAddr) -> bool {
        let listeners = self
            .0
            .own_listeners
            .read()
            .unwrap_or_else(|e| e.into_inner());
        listeners.iter().any(|own| {
            own.port() == address.port()
                && candidates(address.ip()).any(|ip| {
                    ip == own.ip()
                        || ip.is_loopback()
                        || ip.is_unspecified()
                        || own.ip().is_unspecified()
                })
        })
    }

    /// Checks a URL's host as written (an address literal, with its port, or a name) for a
    /// namespace's webhooks: the check a Webhook gets when it is applied.
    pub fn refuse_url_host(&self, namespace: &str, url: &url::Url) -> Option<String> {
        let port = url.port_or_known_default().unwrap_or(0);
        match url.host()? {
            url::Host::Ipv4(ip) => {
                self.refuse_address(namespace, None, SocketAddr::new(IpAddr::V4(ip), port))
            }
            url::Host::Ipv6(ip) => {
                self.refuse_address(namespace, None, SocketAddr::new(IpAddr::V6(ip), port))
            }
            url::Host::Domain(name) => self.refuse_name(namespace, name),
        }
    }
}

/// An address and every IPv4 address embedded in it (IPv4-mapped and -compatible, NAT64,
/// 6to4, Teredo), each of which must pass.
fn candidates(ip: IpAddr) -> impl Iterator<Item = IpAddr> {
    let embedded: Vec<Ipv4Addr> = match ip {
        IpAddr::V4(_) => Vec::new(),
        IpAddr::V6(v6) => embedded_v4(v6),
    };
    std::iter::once(ip).chain(embedded.into_iter().map(IpAddr::V4))
}

fn embedded_v4(v6: Ipv6Addr) -> Vec<Ipv4Addr> {
    let s = v6.segments();
    let low = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    let mut out = Vec::new();
    if let Some(mapped) = v6.to_ipv4_mapped() {
        out.push(mapped);
    }
    // IPv4-compatible (::a.b.c.d, deprecated but still routed by some stacks).
    if s[..6].iter().all(|&x| x == 0) && v6 != Ipv6Addr::UNSPECIFIED && v6 != Ipv6Addr::LOCALHOST {
        out.push(low);
    }
    // NAT64: 64:ff9b::/96 (well-known) and 64:ff9b:1::/48 (local use).
    if s[0] == 0x64 && s[1] == 0xff9b && (s[2..6].iter().all(|&x| x == 0) || s[2] == 1) {
        out.push(low);
    }
    // 6to4: 2002:AABB:CCDD::/48.
    if s[0] == 0x2002 {
        out.push(Ipv4Addr::new(
            (s[1] >> 8) as u8,
            s[1] as u8,
            (s[2] >> 8) as u8,
            s[2] as u8,
        ));
    }
    // Teredo: 2001:0::/32, the server in bits 32-63 and the client, inverted, in the last 32.
    if s[0] == 0x2001 && s[1] == 0 {
        out.push(Ipv4Addr::new(
            (s[2] >> 8) as u8,
            s[2] as u8,
            (s[3] >> 8) as u8,
            s[3] as u8,
        ));
        out.push(Ipv4Addr::from(!u32::from(low)));
    }
    out
}

fn is_loopback(ip: IpAddr) -> bool {
    candidates(ip).any(|c| c.is_loopback())
}

/// Why an address is never a destination unless allowed explicitly, if it is one of those.
fn builtin_refusal(ip: IpAddr) -> Option<&'static str> {
    candidates(ip).find_map(|candidate| match candidate {
        IpAddr::V4(v4) => {
            if v4.is_loopback() {
                Some("a loopback address")
            } else if v4.octets()[0] == 0 {
                Some("an unspecified (\"this network\") address")
            } else if v4.is_link_local() {
                Some("a link-local or metadata address")
            } else if METADATA_V4.contains(&v4) {
                Some("a cloud metadata address")
            } else if v4.is_multicast() || v4.is_broadcast() {
                Some("a multicast or broadcast address")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            if v6.is_loopback() {
                Some("a loopback address")
            } else if v6.is_unspecified() {
                Some("the unspecified address")
            } else if (first & 0xffc0) == 0xfe80 {
                Some("a link-local address")
            } else if v6 == METADATA_V6 {
                Some("a cloud metadata address")
            } else if v6.is_multicast() {
                Some("a multicast address")
            } else {
                None
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> SocketAddr {
        SocketAddr::new(text.parse().expect("ip"), 443)
    }

    #[test]
    fn every_spelling_of_internal_addresses_is_refused_by_default() {
        let policy = DestinationPolicy::default();
        for ip in [
            "127.0.0.1",
            "127.1.2.3",
            "0.0.0.0",
            "0.1.2.3",
            "169.254.169.254",
            "169.254.1.1",
            "100.100.100.200",
            "168.63.129.16",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fe80::1",
            "fd00:ec2::254",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::169.254.169.254",
            "::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b::127.0.0.1",
            "64:ff9b:1::a9fe:a9fe",
            "2002:a9fe:a9fe::1",
            "2002:7f00:1::",
            "2002:a83f:8110::",
            "2001:0:a9fe:a9fe::",
            "ff02::1",
        ] {
            assert!(
                policy.refuse_address("team-a", None, addr(ip)).is_some(),
                "{ip} must be refused"
            );
        }
        for ip in [
            "10.0.0.1",
            "192.168.1.1",
            "8.8.8.8",
            "2001:db8::1",
            "64:ff9b::808:808",
        ] {
            assert!(
                policy.refuse_address("team-a", None, addr(ip)).is_none(),
                "{ip} must be allowed"
            );
        }
        assert!(
            policy
                .refuse_name("team-a", "Metadata.Google.Internal.")
                .is_some()
        );
        assert!(policy.refuse_name("team-a", "hooks.example.com").is_none());
    }

    #[test]
    fn urls_in_other_spellings_of_loopback_are_refused() {
        let policy = DestinationPolicy::default();
        for url in [
            "http://2130706433/",
            "http://0x7f.1/",
            "http://0177.0.0.1/",
            "http://127.1/",
            "http://[::ffff:7f00:1]/",
            "http://[0:0:0:0:0:ffff:127.0.0.1]/",
            "http://0/",
        ] {
            let url = url::Url::parse(url).expect("url");
            assert!(policy.refuse_url_host("team-a", &url).is_some(), "{url}");
        }
    }

    #[test]
    fn loopback_is_allowed_when_asked_but_herald_itself_never() {
        let policy = DestinationPolicy::allowing_loopback();
        assert!(
            policy
                .refuse_address("a", None, addr("127.0.0.1"))
                .is_none()
        );
        assert!(policy.refuse_address("a", None, addr("::1")).is_none());
        assert!(
            policy
                .refuse_address("a", None, addr("169.254.169.254"))
                .is_some()
        );
        policy.add_own_listener("0.0.0.0:8080".parse().expect("addr"));
        policy.add_own_listener("127.0.0.1:8081".parse().expect("addr"));
        for own in [
            "127.0.0.1:8080",
            "127.0.0.1:8081",
            "[::1]:8081",
            "10.1.2.3:8080",
            "[::ffff:127.0.0.1]:8081",
        ] {
            let own: SocketAddr = own.parse().expect("addr");
            assert!(policy.refuse_address("a", None, own).is_some(), "{own}");
        }
        assert!(
            policy
                .refuse_address("a", None, "127.0.0.1:9000".parse().expect("addr"))
                .is_none()
        );
    }

    #[test]
    fn allow_and_deny_rules_per_namespace_and_for_all() {
        let rule = |t: &str| t.parse::<DestinationRule>().expect("rule");
        let policy = DestinationPolicy::new(
            vec![rule("team-a=10.0.0.0/8"), rule("team-a=*.example.com")],
            vec![rule("10.96.0.0/12"), rule("team-b=hooks.internal")],
            false,
        );
        // team-a: only what its allow rules name.
        assert!(
            policy
                .refuse_address("team-a", None, addr("10.1.2.3"))
                .is_none()
        );
        assert!(
            policy
                .refuse_address("team-a", None, addr("8.8.8.8"))
                .is_some()
        );
        assert!(
            policy
                .refuse_address("team-a", Some("api.example.com"), addr("8.8.8.8"))
                .is_none()
        );
        // A deny for all wins over an allow.
        assert!(
            policy
                .refuse_address("team-a", None, addr("10.96.0.1"))
                .is_some()
        );
        // team-b: no allow rules, so anything but what is denied.
        assert!(
            policy
                .refuse_address("team-b", None, addr("8.8.8.8"))
                .is_none()
        );
        assert!(policy.refuse_name("team-b", "hooks.internal").is_some());
        assert!(policy.refuse_name("team-c", "hooks.internal").is_none());
        assert!(policy.has_rules_for("team-a") && !policy.has_rules_for("team-c"));
        assert!("team-a=".parse::<DestinationRule>().is_err());
        assert!("=10.0.0.0/8".parse::<DestinationRule>().is_err());
        assert!("not a host!".parse::<DestinationRule>().is_err());
    }
}
