//! The stylesheet and the script, embedded at build time. Their paths carry a version so a browser never
//! keeps an old copy across upgrades, which lets them be cached for a long time.

use axum::http::header;
use axum::response::IntoResponse;

pub const CSS_PATH: &str = concat!("/console/assets/console-", env!("CARGO_PKG_VERSION"), ".css");
pub const JS_PATH: &str = concat!("/console/assets/console-", env!("CARGO_PKG_VERSION"), ".js");

const CSS: &str = include_str!("assets/console.css");
const JS: &str = include_str!("assets/console.js");

/// A day: the version in the path changes with each release.
const CACHE: &str = "public, max-age=86400";

pub async fn css() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8"), (header::CACHE_CONTROL, CACHE)], CSS)
}

pub async fn js() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8"), (header::CACHE_CONTROL, CACHE)], JS)
}
