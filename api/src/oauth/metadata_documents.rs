//! Client ID Metadata Documents (draft-ietf-oauth-client-id-metadata-document): a client whose
//! `client_id` is an https URL publishes its metadata there, and this server fetches it instead of
//! asking the client to register. The fetch is an SSRF risk, so: https only, no redirects, a 5 s
//! timeout, at most 64 KiB, and the host must resolve to public addresses only (the connection is
//! pinned to the address that was checked, so DNS rebinding cannot swap it), unless
//! `--oauth-client-metadata-allow-private` permits private and loopback hosts (and plain http on
//! loopback) for internal clients and development. Documents are cached for five minutes.

use super::clients::{Client, is_loopback_http, redirect_problem};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const MAX_DOCUMENT: usize = 64 * 1024;
const CACHE_FOR: Duration = Duration::from_secs(300);

/// Fetches and caches client metadata documents.
pub struct MetadataDocuments {
    allow_private: bool,
    cache: Mutex<HashMap<String, Cached>>,
}

/// A fetched client or the reason it was refused, and when.
type Cached = (Result<Client, String>, Instant);

/// Refusals are remembered this long, so anonymous requests cannot make the server fetch a
/// bad URL again and again.
const REFUSALS_CACHED_FOR: Duration = Duration::from_secs(60);

/// Whether `ip` is an address a server on the public internet may have.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (64..128).contains(&o[1]))
                || (o[0] == 192 && o[1] == 0 && o[2] == 0)
                || (o[0] == 198 && (18..20).contains(&o[1]))
                || o[0] >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let s = v6.segments();
            let embedded_v4 = |hi: u16, lo: u16| {
                IpAddr::V4(std::net::Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8))
            };
            // Forms that carry an IPv4 address: check the address they lead to.
            let nat64 = s[0] == 0x64 && s[1] == 0xff9b && (s[2..6] == [0, 0, 0, 0] || s[2] == 1);
            if nat64 {
                return is_public(embedded_v4(s[6], s[7]));
            }
            if s[0] == 0x2002 {
                return is_public(embedded_v4(s[1], s[2]));
            }
            // Only global unicast (2000::/3), minus Teredo, documentation and the v4-compatible
            // and site-local ranges, is public.
            let global_unicast = (s[0] & 0xe000) == 0x2000;
            let teredo = s[0] == 0x2001 && s[1] == 0;
            let documentation = s[0] == 0x2001 && s[1] == 0x0db8;
            global_unicast && !teredo && !documentation
        }
    }
}

/// Whether a `client_id` is a metadata-document URL rather than a registered id.
pub fn is_document_id(client_id: &str) -> bool {
    client_id.starts_with("https://") || client_id.starts_with("http://")
}

impl MetadataDocuments {
    /// With or without private addresses allowed.
    pub fn new(allow_private: bool) -> Self {
        Self { allow_private, cache: Mutex::default() }
    }

    /// The client a document URL describes, fetched or cached.
    pub async fn client(&self, client_id: &str) -> Result<Client, String> {
        if let Some((outcome, at)) = self.cache.lock().unwrap_or_else(|e| e.into_inner()).get(client_id) {
            let fresh = if outcome.is_ok() { CACHE_FOR } else { REFUSALS_CACHED_FOR };
            if at.elapsed() < fresh {
                return outcome.clone();
            }
        }
        let outcome = self.fetch(client_id).await;
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() > 10_000 {
            cache.clear();
        }
        cache.insert(client_id.to_string(), (outcome.clone(), Instant::now()));
        outcome
    }

    async fn fetch(&self, client_id: &str) -> Result<Client, String> {
        let url = reqwest::Url::parse(client_id).map_err(|_| "client_id is not a URL".to_string())?;
        if url.fragment().is_some() || !url.username().is_empty() || url.password().is_some() {
            return Err("client_id URL must not have a fragment or credentials".into());
        }
        if url.path().is_empty() || url.path() == "/" {
            return Err("client_id URL must have a path".into());
        }
        let host = url.host_str().ok_or("client_id URL has no host")?.to_string();
        let port = url.port_or_known_default().ok_or("client_id URL has no port")?;
        let addresses: Vec<SocketAddr> =
            tokio::time::timeout(Duration::from_secs(5), tokio::net::lookup_host((host.as_str(), port)))
                .await
                .map_err(|_| "cannot resolve the client_id host in time".to_string())?
                .map_err(|e| format!("cannot resolve the client_id host: {e}"))?
                .collect();
        let address = *addresses.first().ok_or("the client_id host has no address")?;
        let all_public = addresses.iter().all(|a| is_public(a.ip()));
        match (url.scheme(), all_public, self.allow_private) {
            ("https", true, _) => {}
            ("https", false, true) => {}
            ("http", _, true) if addresses.iter().all(|a| a.ip().is_loopback()) => {}
            ("http", _, _) => return Err("client_id URL must use https".into()),
            (_, false, false) => return Err("the client_id host resolves to a private address".into()),
            _ => return Err("client_id URL must use https".into()),
        }
        // Pinned to the checked address: a second DNS answer cannot point the fetch elsewhere.
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            // A proxy would resolve the host itself and undo the pinning.
            .no_proxy()
            .timeout(Duration::from_secs(5))
            .resolve(&host, address)
            .build()
            .map_err(|e| format!("cannot build a client: {e}"))?;
        let mut response = http
            .get(url.clone())
            .send()
            .await
            .map_err(|e| format!("cannot fetch the document: {}", e.without_url()))?;
        if !response.status().is_success() {
            return Err(format!("the document answered HTTP {}", response.status()));
        }
        let mut body = Vec::new();
        while let Some(chunk) =
            response.chunk().await.map_err(|e| format!("cannot read the document: {}", e.without_url()))?
        {
            body.extend_from_slice(&chunk);
            if body.len() > MAX_DOCUMENT {
                return Err("the document is over 64 KiB".into());
            }
        }
        let document: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| format!("the document is not JSON: {e}"))?;
        if document.get("client_id").and_then(|v| v.as_str()) != Some(client_id) {
            return Err("the document's client_id is not its own URL".into());
        }
        let method = document.get("token_endpoint_auth_method").and_then(|v| v.as_str()).unwrap_or("none");
        if method != "none" {
            return Err(format!(
                "token_endpoint_auth_method {method:?} is not supported for metadata documents; use none"
            ));
        }
        let redirect_uris: Vec<String> = document
            .get("redirect_uris")
            .and_then(|v| serde_json::from_value(v.clone()).ok())
            .filter(|r: &Vec<String>| !r.is_empty())
            .ok_or("the document has no redirect_uris")?;
        let application_type =
            document.get("application_type").and_then(|v| v.as_str()).map(str::to_string).unwrap_or_else(|| {
                // Loopback redirect URIs mean a native app (RFC 8252).
                if redirect_uris.iter().all(|u| is_loopback_http(u)) { "native".into() } else { "web".into() }
            });
        for uri in &redirect_uris {
            if let Some(problem) = redirect_problem(uri, &application_type) {
                return Err(problem);
            }
        }
        let grant_types: Vec<String> = document
            .get("grant_types")
            .and_then(|v| serde_json::from_value(v.clone()).ok())
            .unwrap_or_else(|| vec!["authorization_code".into()]);
        Ok(Client {
            client_id: client_id.to_string(),
            secret_hash: None,
            client_name: document.get("client_name").and_then(|v| v.as_str()).map(str::to_string),
            redirect_uris: serde_json::to_string(&redirect_uris).unwrap_or_default(),
            application_type,
            token_endpoint_auth_method: "none".into(),
            grant_types: serde_json::to_string(&grant_types).unwrap_or_default(),
            created_at: chrono::Utc::now(),
            tenant: None,
            persona: None,
            created_by: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_addresses_are_public() {
        for private in [
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "127.0.0.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:10.0.0.1",
        ] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
        for public in ["93.184.216.34", "8.8.8.8", "2606:4700::1111"] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
    }

    #[tokio::test]
    async fn unsafe_document_urls_are_refused_before_any_request() {
        let docs = MetadataDocuments::new(false);
        for (url, reason) in [
            ("http://127.0.0.1:9/client.json", "https"),
            ("https://127.0.0.1:9/client.json", "private"),
            ("https://localhost:9/client.json", "private"),
            ("https://example.com/", "path"),
            ("https://user:pw@example.com/c.json", "credentials"),
            ("https://example.com/c.json#x", "fragment"),
        ] {
            let error = docs.client(url).await.unwrap_err();
            assert!(error.contains(reason), "{url}: {error}");
        }
    }
}
