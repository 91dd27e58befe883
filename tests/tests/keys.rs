//! Key management over REST: admins mint, list, rotate and revoke keys; the plaintext is shown
//! once; keys minted over REST work like ApiKey resources; everything is audited.

mod support;

use serde_json::{Value, json};
use std::time::Duration;
use support::*;

async fn post(api: &Api, key: &str, path: &str, body: &Value, idempotency: Option<&str>) -> reqwest::Response {
    let mut request = reqwest::Client::new().post(format!("{}{path}", api.base)).header("X-API-Key", key).json(body);
    if let Some(k) = idempotency {
        request = request.header("Idempotency-Key", k);
    }
    request.send().await.unwrap()
}

async fn delete(api: &Api, key: &str, path: &str) -> u16 {
    reqwest::Client::new()
        .delete(format!("{}{path}", api.base))
        .header("X-API-Key", key)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn admins_mint_list_rotate_and_revoke_keys() {
    let upstream = Upstream::start("both").await;
    let gateway = Gateway::start(&quickstart(&upstream.url())).await;
    wait_until(Duration::from_secs(10), || async { !gateway.tool_names(ANALYST_KEY).await.is_empty() }).await;
    let analyst_tools = gateway.tool_names(ANALYST_KEY).await;

    // Mint for the analyst persona: 201, Location, the plaintext once.
    let body = json!({"persona": "analyst", "description": "nightly report"});
    let r = post(&gateway, ADMIN_KEY, "/api/v1/admin/auth/keys", &body, Some("mint-1")).await;
    assert_eq!(r.status(), 201);
    let location = r.headers()["location"].to_str().unwrap().to_string();
    let minted: Value = r.json().await.unwrap();
    let key = minted["key"].as_str().unwrap().to_string();
    let id = minted["id"].as_str().unwrap().to_string();
    assert_eq!(location, format!("/api/v1/admin/auth/keys/{id}"));
    assert!(key.starts_with("pcl_") && minted["active"] == true && minted["persona"] == "analyst", "{minted}");
    // It works exactly like the analyst's ApiKey.
    assert_eq!(gateway.tool_names(&key).await, analyst_tools);
    let me: Value = gateway.get(&key, "/api/v1/portal/me").await.json().await.unwrap();
    assert_eq!(me["persona"], "analyst");

    // A retry with the same Idempotency-Key returns the same key, not a second one.
    let replay = post(&gateway, ADMIN_KEY, "/api/v1/admin/auth/keys", &body, Some("mint-1")).await;
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    let replayed: Value = replay.json().await.unwrap();
    assert_eq!(replayed["key"], minted["key"]);

    // Listed without the plaintext.
    let list: Value = gateway.get(ADMIN_KEY, "/api/v1/admin/auth/keys?per_page=10").await.json().await.unwrap();
    assert_eq!(list["total"], 1, "{list}");
    assert_eq!(list["items"][0]["id"], id.as_str());
    assert!(!list.to_string().contains(&key), "the list never shows keys");

    // Refusals: not an admin, unknown persona, expiry in the past, unknown fields.
    assert_eq!(post(&gateway, ANALYST_KEY, "/api/v1/admin/auth/keys", &body, None).await.status(), 403);
    assert_eq!(gateway.get(ANALYST_KEY, "/api/v1/admin/auth/keys").await.status(), 403);
    let r = post(&gateway, ADMIN_KEY, "/api/v1/admin/auth/keys", &json!({"persona": "ghost"}), None).await;
    assert_eq!(r.status(), 422);
    let past = json!({"persona": "analyst", "expires_at": "2020-01-01T00:00:00Z"});
    assert_eq!(post(&gateway, ADMIN_KEY, "/api/v1/admin/auth/keys", &past, None).await.status(), 422);
    let extra = json!({"persona": "analyst", "admin": true});
    assert_eq!(post(&gateway, ADMIN_KEY, "/api/v1/admin/auth/keys", &extra, None).await.status(), 400);

    // Rotate: a new key; the old one stops at once (no grace period asked).
    let r = post(&gateway, ADMIN_KEY, &format!("/api/v1/admin/auth/keys/{id}/rotate"), &json!({}), None).await;
    assert_eq!(r.status(), 201);
    let rotated: Value = r.json().await.unwrap();
    let new_key = rotated["key"].as_str().unwrap().to_string();
    assert_ne!(new_key, key);
    assert_eq!(rotated["description"], "nightly report");
    assert_eq!(gateway.get(&key, "/api/v1/portal/me").await.status(), 401);
    assert_eq!(gateway.get(&new_key, "/api/v1/portal/me").await.status(), 200);

    // Rotate with a grace period: both work until it ends.
    let new_id = rotated["id"].as_str().unwrap().to_string();
    let r = post(
        &gateway,
        ADMIN_KEY,
        &format!("/api/v1/admin/auth/keys/{new_id}/rotate"),
        &json!({"grace_seconds": 3600}),
        None,
    )
    .await;
    let third: Value = r.json().await.unwrap();
    let third_key = third["key"].as_str().unwrap().to_string();
    assert_eq!(gateway.get(&new_key, "/api/v1/portal/me").await.status(), 200, "grace period");
    assert_eq!(gateway.get(&third_key, "/api/v1/portal/me").await.status(), 200);

    // Revoke: refused at once; a second revoke finds nothing.
    let third_id = third["id"].as_str().unwrap().to_string();
    assert_eq!(delete(&gateway, ADMIN_KEY, &format!("/api/v1/admin/auth/keys/{third_id}")).await, 204);
    assert_eq!(gateway.get(&third_key, "/api/v1/portal/me").await.status(), 401);
    assert_eq!(delete(&gateway, ADMIN_KEY, &format!("/api/v1/admin/auth/keys/{third_id}")).await, 404);
    assert_eq!(delete(&gateway, ADMIN_KEY, "/api/v1/admin/auth/keys/nope").await, 404);

    // Audited, by key id, never with a key.
    wait_until(Duration::from_secs(5), || async {
        let events = gateway.audit("per_page=500").await;
        let minted_id = minted["key_id"].as_str().unwrap();
        events
            .iter()
            .any(|e| e["detail"].as_str().is_some_and(|d| d == format!("minted key {minted_id} for persona analyst")))
            && events.iter().any(|e| e["detail"].as_str().is_some_and(|d| d.starts_with("revoked key ")))
    })
    .await;
    let events = gateway.audit("per_page=1000").await.iter().map(Value::to_string).collect::<String>();
    for k in [&key, &new_key, &third_key] {
        assert!(!events.contains(k.as_str()), "a key leaked into the audit log");
    }
    assert!(!gateway.stderr.text().contains(&key), "a key leaked into the log");

    // Keys survive a restart (dev mode keeps them in its database).
    let mut gateway = gateway;
    gateway.restart().await;
    gateway.wait_ready().await;
    assert_eq!(gateway.get(&new_key, "/api/v1/portal/me").await.status(), 200);
    assert_eq!(gateway.get(&key, "/api/v1/portal/me").await.status(), 401);
}
