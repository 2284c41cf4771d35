//! The service URL as a list of targets, and the task that resolves their names again and again.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Weak},
};

use futures::future::BoxFuture;

use crate::local::Transport;

use super::core::Pool;

/// A DNS lookup: every address of `host` with `port`. [`resolver`] is tokio's
/// (`getaddrinfo`); tests give their own to make a name resolve to what they need.
pub type Resolve =
    Arc<dyn Fn(String, u16) -> BoxFuture<'static, std::io::Result<Vec<SocketAddr>>> + Send + Sync>;

/// The transport for one endpoint's address.
pub(crate) type Connect =
    Arc<dyn Fn(SocketAddr) -> Result<Transport, tonic::transport::Error> + Send + Sync>;

/// The system resolver, through [`tokio::net::lookup_host`].
pub fn resolver() -> Resolve {
    Arc::new(|host: String, port: u16| {
        Box::pin(async move {
            Ok(tokio::net::lookup_host((host.as_str(), port))
                .await?
                .collect())
        })
    })
}

/// Why a service URL (or one element of a list of them) cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{url:?}: {reason}")]
pub struct BadUrl {
    /// The element at fault.
    pub url: String,
    /// What is wrong with it.
    pub reason: String,
}

impl BadUrl {
    fn new(url: &str, reason: impl fmt::Display) -> Self {
        Self {
            url: url.to_string(),
            reason: reason.to_string(),
        }
    }
}

/// One element of a service URL list: `http://host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The host: a name to resolve, or an IP address.
    pub host: String,
    /// The port (80 when the URL names none, as for any `http://` URL).
    pub port: u16,
    /// The host as an IP address, when it is one (nothing to resolve).
    pub ip: Option<IpAddr>,
}

impl Target {
    /// Parses `http://host[:port]`.
    pub fn parse(url: &str) -> Result<Self, BadUrl> {
        let url = url.trim();
        let uri: http::Uri = url.parse().map_err(|e| BadUrl::new(url, e))?;
        if uri.scheme_str() != Some("http") {
            return Err(BadUrl::new(url, "must be an http://host:port URL"));
        }
        let authority = uri
            .authority()
            .filter(|a| !a.host().is_empty())
            .ok_or_else(|| BadUrl::new(url, "has no host"))?;
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        Ok(Self {
            host: host.to_string(),
            port: authority.port_u16().unwrap_or(80),
            ip: host.parse().ok(),
        })
    }

    /// Parses a comma-separated list of URLs, naming the bad element.
    pub fn parse_list(urls: &str) -> Result<Vec<Self>, BadUrl> {
        let targets = urls
            .split(',')
            .map(|url| {
                if url.trim().is_empty() {
                    Err(BadUrl::new(urls, "has an empty element in its list"))
                } else {
                    Self::parse(url)
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        if targets.is_empty() {
            return Err(BadUrl::new(urls, "names no URL"));
        }
        Ok(targets)
    }
}

/// Fills `pool` with the addresses of `targets` now if they are all IP addresses (nothing to
/// resolve, ever), else spawns the task that resolves them every `resolve_interval` while the
/// pool lives. A name that fails to resolve keeps its previous addresses.
pub(crate) fn start(pool: &Arc<Pool>, targets: Vec<Target>, resolve: Resolve, connect: Connect) {
    if let Some(addrs) = targets
        .iter()
        .map(|t| t.ip.map(|ip| SocketAddr::new(ip, t.port)))
        .collect::<Option<Vec<_>>>()
    {
        pool.update(&dedup(addrs.into_iter()), &*connect);
        return;
    }
    let weak = Arc::downgrade(pool);
    let interval = pool.config().resolve_interval;
    let service = pool.service().to_string();
    tokio::spawn(async move {
        let mut last: Vec<Vec<SocketAddr>> = vec![Vec::new(); targets.len()];
        loop {
            for (target, known) in targets.iter().zip(last.iter_mut()) {
                if let Some(ip) = target.ip {
                    *known = vec![SocketAddr::new(ip, target.port)];
                    continue;
                }
                match resolve(target.host.clone(), target.port).await {
                    Ok(addrs) if !addrs.is_empty() => *known = addrs,
                    Ok(_) => tracing::warn!(%service, host = %target.host,
                        "the name resolved to no address; keeping the previous ones"),
                    Err(error) => tracing::warn!(%service, host = %target.host, %error,
                        "could not resolve the name; keeping the previous addresses"),
                }
            }
            let Some(pool) = Weak::upgrade(&weak) else {
                return;
            };
            pool.update(&dedup(last.iter().flatten().copied()), &*connect);
            drop(pool);
            tokio::time::sleep(interval).await;
            if weak.strong_count() == 0 {
                return;
            }
        }
    });
}

fn dedup(addrs: impl Iterator<Item = SocketAddr>) -> Vec<SocketAddr> {
    let mut unique = Vec::new();
    for addr in addrs {
        if !unique.contains(&addr) {
            unique.push(addr);
        }
    }
    unique
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn lists_parse_and_name_the_bad_element() {
        let targets = Target::parse_list("http://10.0.0.1:50052, http://inference").unwrap();
        assert_eq!(targets[0].ip, Some("10.0.0.1".parse().unwrap()));
        assert_eq!(targets[1].host, "inference");
        assert_eq!(targets[1].port, 80);
        assert_eq!(targets[1].ip, None);
        let v6 = Target::parse("http://[::1]:7").unwrap();
        assert_eq!(v6.ip, Some("::1".parse().unwrap()));
        let error = Target::parse_list("http://a:1,ftp://b:2").unwrap_err();
        assert_eq!(error.url, "ftp://b:2");
        assert!(Target::parse_list("http://a:1,,http://b:2").is_err());
        assert!(Target::parse_list("").is_err());
    }
}
