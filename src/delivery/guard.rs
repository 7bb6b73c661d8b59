//! Refusing link-local and cloud metadata addresses as webhook destinations (an optional guard
//! against server-side request forgery through a Webhook's URL).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Host names of cloud metadata services.
const METADATA_HOSTS: &[&str] = &[
    "metadata.google.internal",
    "metadata.goog",
    "metadata",
    "instance-data",
    "instance-data.ec2.internal",
];

/// Whether an address is link-local or a known cloud metadata address.
pub fn is_forbidden_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_forbidden_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_forbidden_v4(v4);
            }
            let first = v6.segments()[0];
            // fe80::/10 link-local; fd00:ec2::254 is the EC2 metadata service over IPv6.
            (first & 0xffc0) == 0xfe80 || v6 == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)
        }
    }
}

fn is_forbidden_v4(v4: Ipv4Addr) -> bool {
    // 169.254.0.0/16 link-local (169.254.169.254 on most clouds); 100.100.100.200 on Alibaba Cloud.
    v4.is_link_local() || v4 == Ipv4Addr::new(100, 100, 100, 200)
}

/// Why a host is refused, or `None` when it may be used.
pub fn refuse_host(host: &url::Host<&str>) -> Option<String> {
    match host {
        url::Host::Ipv4(ip) if is_forbidden_v4(*ip) => {
            Some(format!("{ip} is a link-local or metadata address"))
        }
        url::Host::Ipv6(ip) if is_forbidden_ip(IpAddr::V6(*ip)) => {
            Some(format!("{ip} is a link-local or metadata address"))
        }
        url::Host::Domain(name) => {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            METADATA_HOSTS
                .contains(&name.as_str())
                .then(|| format!("{name} is a cloud metadata service"))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_local_and_metadata_addresses_are_forbidden() {
        for ip in [
            "169.254.169.254",
            "169.254.1.1",
            "100.100.100.200",
            "fe80::1",
            "fd00:ec2::254",
            "::ffff:169.254.169.254",
        ] {
            assert!(is_forbidden_ip(ip.parse().expect("ip")), "{ip}");
        }
        for ip in [
            "127.0.0.1",
            "10.0.0.1",
            "192.168.1.1",
            "8.8.8.8",
            "::1",
            "2001:db8::1",
        ] {
            assert!(!is_forbidden_ip(ip.parse().expect("ip")), "{ip}");
        }
        assert!(refuse_host(&url::Host::Domain("Metadata.Google.Internal.")).is_some());
        assert!(refuse_host(&url::Host::Domain("hooks.example.com")).is_none());
    }
}
