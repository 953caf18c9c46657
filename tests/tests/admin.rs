//! The admin endpoint's guard, on a real `thalamus run`: reads are open; a request that changes
//! something needs the bearer token and must not come from another site's page; each refusal
//! is counted. A node without a configured token generates one into its data directory at
//! first start (mode 0600), prints it once, and keeps it across restarts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use thalamus_tests::cluster::{http_request, http_request_with};
use thalamus_tests::{Gateway, ADMIN_TOKEN};

fn metric(text: &str, line_start: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(line_start))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

#[test]
fn mutations_need_the_token_and_refuse_cross_site_requests() {
    let gw = Gateway::start("").unwrap();
    let drain = |headers: &str| {
        http_request_with(gw.admin, "POST", "/drain", headers)
            .unwrap()
            .0
    };
    assert_eq!(drain(""), 401, "no token");
    assert_eq!(
        drain("Authorization: Bearer wrong-token-wrong-token\r\n"),
        401
    );
    let bearer = format!("Authorization: Bearer {ADMIN_TOKEN}\r\n");
    assert_eq!(
        drain(&format!("{bearer}Origin: https://evil.example\r\n")),
        403,
        "another site's page, even with the token"
    );
    assert_eq!(
        drain(&format!("{bearer}Sec-Fetch-Site: cross-site\r\n")),
        403
    );
    // Nothing changed.
    let (status, body) = http_request_with(gw.admin, "GET", "/drain", "").unwrap();
    assert_eq!(status, 200, "reads need no token");
    assert!(body.contains("\"draining\":false"), "{body}");
    // With the token, from a tool: done.
    assert_eq!(drain(&bearer), 200);
    let (_, body) = http_request(gw.admin, "GET", "/drain").unwrap();
    assert!(body.contains("\"draining\":true"), "{body}");
    assert_eq!(
        http_request_with(gw.admin, "DELETE", "/drain", "")
            .unwrap()
            .0,
        401
    );
    let metrics = gw.admin_get("/metrics").unwrap();
    let refused = |reason: &str| {
        metric(
            &metrics,
            &format!("thalamus_admin_refused_total{{reason=\"{reason}\"}} "),
        )
    };
    assert_eq!(refused("no_token"), 2.0, "{metrics}");
    assert_eq!(refused("bad_token"), 1.0);
    assert_eq!(refused("cross_site"), 2.0);
}

#[test]
fn a_token_is_generated_once_into_the_data_directory() {
    // This node has no `[admin] token`, so it generates its own.
    let gw = Gateway::start_in_with(tempfile::tempdir().unwrap(), "127.0.0.1:0", "", None).unwrap();
    let path = gw.data_dir().join("admin.token");
    let token = std::fs::read_to_string(&path).unwrap();
    assert_eq!(token.len(), 64, "{token}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    assert!(
        gw.stdout().contains(&token),
        "the banner prints a generated token once"
    );
    let bearer = format!("Authorization: Bearer {token}\r\n");
    assert_eq!(
        http_request_with(gw.admin, "POST", "/drain", &bearer)
            .unwrap()
            .0,
        200
    );
    // Kept across a restart, and not printed again.
    let gw = Gateway::start_in_with(gw.kill(), "127.0.0.1:0", "", None).unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), token);
    assert!(!gw.stdout().contains(&token));
    assert_eq!(
        http_request_with(gw.admin, "DELETE", "/drain", &bearer)
            .unwrap()
            .0,
        200
    );
}
