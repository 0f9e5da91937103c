//! Reading jobhook's `/metrics` (Prometheus text).

/// The upper bound of the histogram bucket holding quantile `q` (Prometheus text, cumulative buckets).
pub(super) fn histogram_quantile(text: &str, metric: &str, q: f64) -> Option<f64> {
    let prefix = format!("{metric}_bucket{{le=\"");
    let buckets: Vec<(f64, f64)> = text
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|rest| {
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
            Some((le, count.trim().parse().ok()?))
        })
        .collect();
    let total = buckets.last()?.1;
    buckets.iter().find(|(_, c)| *c >= q * total).map(|(le, _)| *le)
}

pub(super) fn bucket_ms(bound: Option<f64>) -> String {
    match bound {
        Some(b) if b.is_finite() => format!("{:.0}", b * 1000.0),
        Some(_) => "∞".into(),
        None => "?".into(),
    }
}

/// The value of an unlabelled metric (0 if absent).
pub(super) fn metric_value(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}
