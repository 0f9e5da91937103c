//! HTML by hand: an escaping function, the page frame, and the few pieces every page shares. Every value
//! that did not come from this file goes through [`esc`]; there is no template engine to learn.

use std::fmt::Write;

use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};

use crate::domain::SubscriptionState;

/// Escapes text for an element's content or a quoted attribute value.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Escapes a query-string value (a state, a job ID or a cursor in a link).
pub fn q(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// Who is signed in, for the page frame: the navigation and the sign-out form.
pub struct Nav<'a> {
    pub tenant_id: i64,
    pub csrf: &'a str,
    /// Which section is current (`subscriptions`, `register`, `secret`).
    pub current: &'a str,
}

/// A whole page.
pub fn page(status: StatusCode, title: &str, nav: Option<&Nav<'_>>, main: &str) -> Response {
    let mut out = String::with_capacity(main.len() + 2048);
    let _ = write!(
        out,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{} · jobhook</title>\
         <link rel=\"stylesheet\" href=\"{}\"><script src=\"{}\" defer></script></head><body>\
         <a class=\"skip\" href=\"#main\">Skip to content</a><header><span class=\"brand\">jobhook</span>",
        esc(title),
        super::assets::CSS_PATH,
        super::assets::JS_PATH,
    );
    if let Some(nav) = nav {
        let link = |href: &str, section: &str, label: &str| {
            let current = if nav.current == section { " aria-current=\"page\"" } else { "" };
            format!("<li><a href=\"{href}\"{current}>{label}</a></li>")
        };
        let _ = write!(
            out,
            "<nav aria-label=\"Main\"><ul>{}{}{}</ul></nav>\
             <form method=\"post\" action=\"/console/sign-out\" class=\"signout\">{}\
             <span class=\"who\">tenant {}</span> <button type=\"submit\">Sign out</button></form>",
            link("/console/subscriptions", "subscriptions", "Subscriptions"),
            link("/console/register", "register", "Register a job"),
            link("/console/secret", "secret", "Signing secret"),
            csrf_field(nav.csrf),
            nav.tenant_id,
        );
    }
    let _ = write!(out, "</header><main id=\"main\">{main}</main></body></html>");
    (status, Html(out)).into_response()
}

/// The hidden CSRF field of a form.
pub fn csrf_field(token: &str) -> String {
    format!("<input type=\"hidden\" name=\"csrf\" value=\"{}\">", esc(token))
}

/// A subscription's state in colour and in words.
pub fn state_badge(state: SubscriptionState) -> String {
    let s = state.as_str();
    format!("<span class=\"state state-{s}\">{s}</span>")
}

/// A notice above a page's content: `ok` or `error`.
pub fn notice(kind: &str, text: &str) -> String {
    let role = if kind == "error" { "alert" } else { "status" };
    format!("<p class=\"notice notice-{kind}\" role=\"{role}\">{}</p>", esc(text))
}

/// An RFC 3339 time, as a `<time>` element (readable, and machine-readable for the tooltip).
pub fn time(rfc3339: &str) -> String {
    // To the second: milliseconds are noise on a page (the datetime attribute keeps them).
    let seconds = rfc3339.split(['.', 'Z']).next().unwrap_or(rfc3339);
    let shown = format!("{} UTC", seconds.replace('T', " "));
    format!("<time datetime=\"{}\">{}</time>", esc(rfc3339), esc(&shown))
}

/// A page saying something is not there (an unknown ID, another tenant's subscription, a bad path).
pub fn not_found(nav: Option<&Nav<'_>>) -> Response {
    page(
        StatusCode::NOT_FOUND,
        "Not found",
        nav,
        "<h1>Not found</h1><p>There is no such page or subscription for this API key.</p>\
         <p><a href=\"/console/subscriptions\">Back to your subscriptions</a></p>",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markup_is_escaped() {
        assert_eq!(esc("<a href=\"x\">'&'</a>"), "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;");
        assert_eq!(q("a b&c=d"), "a+b%26c%3Dd");
        assert!(time("2026-12-01T04:33:09.5Z").contains(">2026-12-01 04:33:09 UTC<"));
        assert!(time("2026-12-01T04:33:09Z").contains(">2026-12-01 04:33:09 UTC<"));
    }
}
