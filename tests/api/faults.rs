//! Faults injected on both sides: a misbehaving upstream, misbehaving receivers, DNS that changes its
//! mind, a rate cap under a flood of registrations.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use jobhook::delivery::client::Lookup;
use jobhook::mock_upstream::{Answer, MockArgs, MockUpstream};
use serde_json::Value;

use crate::support::helpers::*;
use crate::support::raw::{Misbehaviour, RawReceiver};

/// Registers a job scripted with `answers`, waits until its last_error mentions `expected`, then lets
/// the upstream recover and checks the job is still delivered.
async fn survives(app: &TestApp, answers: Vec<Answer>, expected: &str) {
    let job = new_job();
    let job_id: jobhook::domain::JobId = job.parse().unwrap();
    app.upstream.script(job_id.clone(), answers);
    let sub = app.register(&job, &app.receiver.url(&format!("/{job}"))).await;
    let id = sub["id"].as_str().unwrap();
    eventually(Duration::from_secs(10), &format!("last_error to mention {expected:?}"), || async {
        let sub = app.subscription(id).await;
        assert_eq!(sub["state"], "polling", "{sub}");
        sub["last_error"].as_str().is_some_and(|e| e.contains(expected)).then_some(())
    })
    .await;
    app.upstream.script(job_id.clone(), vec![Answer::Succeed]);
    let done = app.wait_for_state(id, "delivered").await;
    assert!(done["last_error"].is_null());
    assert_eq!(app.upstream.polls(job_id.clone()).max_in_flight, 1);
}

#[tokio::test]
async fn broken_upstream_answers_are_retried_and_shown_as_last_error() {
    let app = spawn_app().await;
    survives(&app, vec![Answer::Status(500), Answer::Status(502), Answer::Status(503)], "HTTP 503").await;
    survives(&app, vec![Answer::Truncated], "connection closed").await;
    survives(&app, vec![Answer::Garbage], "not a job status").await;
    survives(&app, vec![Answer::OtherJob], "instead of").await;
    survives(&app, vec![Answer::UnknownStatus], "unknown job status").await;
    survives(&app, vec![Answer::RetryAfter(429, 0)], "HTTP 429").await;
}

/// Python's standard-library JSON parser (which the stock verifiers use) raises RecursionError on a
/// body nested 10,000 levels deep, after the HMAC has checked out: such a body is never delivered.
#[tokio::test]
async fn a_terminal_body_nested_deeper_than_64_levels_is_polled_again_never_delivered() {
    let app = spawn_app().await;
    let job = new_job();
    let job_id: jobhook::domain::JobId = job.parse().unwrap();
    app.upstream.script(job_id.clone(), vec![Answer::Nested(10_000)]);
    let sub = app.register(&job, &app.receiver.url("/hook")).await;
    let id = sub["id"].as_str().unwrap();
    eventually(Duration::from_secs(10), "last_error to say the body is too deep", || async {
        let sub = app.subscription(id).await;
        assert_eq!(sub["state"], "polling", "{sub}");
        let deep = sub["last_error"].as_str().is_some_and(|e| e.contains("nested deeper than 64"));
        (deep && app.upstream.polls(job_id.clone()).count >= 3).then_some(())
    })
    .await;
    assert!(app.receiver.requests().is_empty(), "the deep body was delivered");
    // 63 arrays inside the object: 64 levels, which passes.
    app.upstream.script(job_id.clone(), vec![Answer::Nested(63)]);
    app.wait_for_state(id, "delivered").await;
    let delivered = app.receiver.wait_for("/hook", 1).await;
    assert!(delivered[0].json()["extra"].is_array());
}

#[tokio::test]
async fn a_burst_of_errors_backs_off_instead_of_hammering_the_upstream() {
    let app = spawn_app().await;
    let job = new_job();
    let job_id: jobhook::domain::JobId = job.parse().unwrap();
    app.upstream.script(job_id.clone(), vec![Answer::Status(500)]);
    let started = Instant::now();
    app.register(&job, &app.receiver.url("/hook")).await;
    eventually(Duration::from_secs(10), "six polls", || async {
        (app.upstream.polls(job_id.clone()).count >= 6).then_some(())
    })
    .await;
    // Back-off doubles from 30 ms: 30+60+120+240+480 ms lie between the first and the sixth poll.
    assert!(started.elapsed() >= Duration::from_millis(800), "six polls in {:?}", started.elapsed());
}

#[tokio::test]
async fn an_upstream_retry_after_given_as_a_date_is_waited_out() {
    let app = spawn_app().await;
    let job = new_job();
    app.upstream.script(job.parse().unwrap(), vec![Answer::RetryAfterDate(503, 2), Answer::Succeed]);
    let started = Instant::now();
    app.register(&job, &app.receiver.url("/hook")).await;
    app.receiver.wait_for("/hook", 1).await;
    // An HTTP date has one-second resolution: two seconds ahead is at least one full second.
    assert!(started.elapsed() >= Duration::from_secs(1), "polled again after {:?}", started.elapsed());
}

#[tokio::test]
async fn an_upstream_that_is_down_for_a_while_is_polled_until_it_is_back() {
    // Reserve a port, start the app against it with nothing listening, then bring the upstream up there.
    let (reserved, addr) = refusing_port();
    let mut settings = Settings::default();
    settings.args.extend(["--upstream-url".into(), format!("http://{addr}")]);
    let app = spawn_app_with(settings).await;
    let sub = app.register(&new_job(), &app.receiver.url("/hook")).await;
    let id = sub["id"].as_str().unwrap();
    eventually(Duration::from_secs(10), "the refused connection to show", || async {
        let sub = app.subscription(id).await;
        sub["last_error"].as_str().is_some_and(|e| e.contains("connect")).then_some(())
    })
    .await;
    let listener = reserved.listen(1024).unwrap();
    let _upstream = MockUpstream::serve(listener, &mock_args(1)).unwrap();
    app.wait_for_state(id, "delivered").await;
}

#[tokio::test]
async fn the_total_poll_rate_never_exceeds_the_cap_and_no_job_is_forgotten() {
    const JOBS: usize = 2_000;
    const RPS: usize = 1_000;
    let app = spawn_app_with(Settings::mock(mock_args(1)).arg("--upstream-max-rps", &RPS.to_string())).await;
    let jobs: Vec<String> = (0..JOBS).map(|_| new_job()).collect();
    let mut registrations = tokio::task::JoinSet::new();
    let app = Arc::new(app);
    for chunk in jobs.chunks(JOBS / 32) {
        let (app, chunk) = (app.clone(), chunk.to_vec());
        registrations.spawn(async move {
            for job in chunk {
                app.register(&job, &app.receiver.url("/hook")).await;
            }
        });
    }
    while registrations.join_next().await.is_some() {}
    eventually(Duration::from_secs(60), "every job to be delivered", || async {
        (app.receiver.requests_to("/hook").len() >= JOBS).then_some(())
    })
    .await;
    let times = app.upstream.poll_times();
    assert_eq!(times.len(), 2 * JOBS, "one Pending and one final poll per job");
    // In any one-second window: at most the rate plus the bucket's burst (a tenth of the rate), plus a
    // little for requests sent in order but arriving bunched (measured here at the upstream).
    let mut busiest = 0;
    let mut start = 0;
    for end in 0..times.len() {
        while times[end] - times[start] >= Duration::from_secs(1) {
            start += 1;
        }
        busiest = busiest.max(end - start + 1);
    }
    assert!(busiest <= RPS + RPS / 10 + RPS / 50, "{busiest} polls in one second with a cap of {RPS}/s");
    eprintln!("rate cap: {} polls, busiest second {busiest} (cap {RPS}/s)", times.len());
}

#[tokio::test]
async fn receiver_errors_redirects_resets_and_timeouts_are_retried_and_logged() {
    let app = spawn_app_with(Settings::default().arg("--delivery-timeout", "300ms")).await;
    let reset = RawReceiver::start("127.0.0.1", Misbehaviour::Reset).await;
    let hang = RawReceiver::start("127.0.0.1", Misbehaviour::Hang).await;
    for (url, expected) in [(reset.url("/hook"), "could not connect|failed|request"), (hang.url("/hook"), "timed out")]
    {
        let sub = app.register(&new_job(), &url).await;
        let id = sub["id"].as_str().unwrap();
        let done = app.wait_for_state(id, "failed").await;
        assert_eq!(done["failure_reason"], "delivery_exhausted");
        let log = app.deliveries(id).await;
        assert_eq!(log.len(), 4, "the first attempt and three retries");
        let error = log[0]["error"].as_str().unwrap();
        assert!(expected.split('|').any(|e| error.contains(e)), "{url}: {error}");
        assert!(log[0]["status_code"].is_null());
    }
    assert_eq!(reset.connections.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn a_receiver_streaming_an_endless_body_costs_a_bounded_read() {
    let app = spawn_app().await;
    let endless = RawReceiver::start("127.0.0.1", Misbehaviour::EndlessBody).await;
    let sub = app.register(&new_job(), &endless.url("/hook")).await;
    let done = app.wait_for_state(sub["id"].as_str().unwrap(), "delivered").await;
    let log = app.deliveries(done["id"].as_str().unwrap()).await;
    assert_eq!(log[0]["status_code"], 200);
    assert!(log[0]["duration_ms"].as_u64().unwrap() < 2_000, "{log:?}");
}

#[tokio::test]
async fn a_tls_error_is_a_failed_attempt() {
    let app = spawn_app().await;
    // An https URL to a plain-HTTP receiver: the handshake fails.
    let url = format!("https://{}/hook", app.receiver.addr);
    let sub = app.register(&new_job(), &url).await;
    let id = sub["id"].as_str().unwrap();
    app.wait_for_state(id, "failed").await;
    let log = app.deliveries(id).await;
    assert!(log[0]["status_code"].is_null());
    assert!(!log[0]["error"].as_str().unwrap().is_empty());
}

#[tokio::test]
async fn a_receivers_retry_after_is_honoured() {
    let app = spawn_app().await;
    app.receiver.answer_with_retry_after(429, 1);
    let started = Instant::now();
    app.register(&new_job(), &app.receiver.url("/slow")).await;
    let got = app.receiver.wait_for("/slow", 2).await;
    assert!(started.elapsed() >= Duration::from_secs(1), "retried after {:?}", started.elapsed());
    assert_eq!(got[0].header("webhook-id"), got[1].header("webhook-id"));
}

#[tokio::test]
async fn a_host_that_never_answers_does_not_slow_the_healthy_ones() {
    let app = spawn_app_with(Settings::default().arg("--delivery-timeout", "20s")).await;
    // The dead host lives on another loopback address, so it is another host to the dispatcher.
    let dead = RawReceiver::start("127.0.0.2", Misbehaviour::Hang).await;
    for _ in 0..64 {
        app.register(&new_job(), &dead.url("/hook")).await;
    }
    eventually(Duration::from_secs(10), "the dead host to hold its slots", || async {
        (dead.connections.load(Ordering::SeqCst) >= 32).then_some(())
    })
    .await;
    let started = Instant::now();
    for i in 0..100 {
        app.register(&new_job(), &app.receiver.url(&format!("/healthy/{i}"))).await;
    }
    eventually(Duration::from_secs(10), "the 100 healthy deliveries", || async {
        (app.receiver.requests().iter().filter(|r| r.path.starts_with("/healthy/")).count() == 100).then_some(())
    })
    .await;
    let took = started.elapsed();
    eprintln!("isolation: 100 healthy deliveries in {took:?} beside 64 hanging ones");
    assert!(took < Duration::from_secs(8), "healthy deliveries waited for the dead host: {took:?}");
    // At most the per-host cap of requests to the dead host are open at once.
    assert!(dead.connections.load(Ordering::SeqCst) <= 32, "{} connections", dead.connections.load(Ordering::SeqCst));
}

/// A DNS whose answer for `rebind.test` is public the first time and loopback afterwards.
pub(crate) fn rebinding_dns() -> Lookup {
    let calls = Arc::new(AtomicUsize::new(0));
    Arc::new(move |host: String, port: u16| {
        let calls = calls.clone();
        Box::pin(async move {
            if host != "rebind.test" {
                return Err(std::io::Error::new(std::io::ErrorKind::NotFound, "no such host"));
            }
            let ip = if calls.fetch_add(1, Ordering::SeqCst) == 0 { "93.184.216.34" } else { "127.0.0.1" };
            Ok(vec![format!("{ip}:{port}").parse().unwrap()])
        })
    })
}

#[tokio::test]
async fn dns_rebinding_after_registration_is_refused_at_connect_time() {
    let settings =
        Settings { lookup: Some(rebinding_dns()), ..Settings::default() }.arg("--allow-private-callbacks", "false");
    let app = spawn_app_with(settings).await;
    let url = format!("http://rebind.test:{}/hook", app.receiver.addr.port());
    let sub = app.register(&new_job(), &url).await;
    let id = sub["id"].as_str().unwrap();
    let done = app.wait_for_state(id, "failed").await;
    assert_eq!(done["failure_reason"], "callback_refused");
    assert!(app.receiver.requests().is_empty(), "the loopback receiver must never be reached");
    let log = app.deliveries(id).await;
    let error = log[0]["error"].as_str().unwrap();
    assert!(error.contains("egress policy"), "{error}");
    assert!(!error.contains("127.0.0.1"), "the refused address is not disclosed: {error}");
}

/// A DNS with a fixed answer per name: `flaky.test` fails for now, `slow.test` never answers,
/// `missing.test` does not exist, `loopback.test` and `private.test` resolve to non-public addresses.
fn scripted_dns() -> Lookup {
    Arc::new(|host: String, port: u16| {
        Box::pin(async move {
            let ip = match host.as_str() {
                "flaky.test" => return Err(std::io::Error::other("temporary failure in name resolution")),
                "slow.test" => std::future::pending().await,
                "missing.test" => return Err(std::io::Error::new(std::io::ErrorKind::NotFound, "no such host")),
                "loopback.test" => "127.0.0.1",
                "private.test" => "10.1.2.3",
                // No public answer: a registration would be delivered there, off this machine.
                _ => return Err(std::io::Error::new(std::io::ErrorKind::NotFound, "no such host")),
            };
            Ok(vec![format!("{ip}:{port}").parse().unwrap()])
        })
    })
}

fn with_scripted_dns() -> Settings {
    Settings { lookup: Some(scripted_dns()), ..Settings::default() }.arg("--allow-private-callbacks", "false")
}

#[tokio::test]
async fn a_dns_failure_at_registration_is_a_503_to_retry_not_a_422() {
    let app = spawn_app_with(with_scripted_dns()).await;
    for host in ["flaky.test", "slow.test"] {
        let refused = app.register_as(KEY_A, &new_job(), &format!("https://{host}/hook")).await;
        assert_eq!(refused.status(), 503, "{host}");
        assert_eq!(refused.headers()["content-type"], "application/problem+json");
        assert!(refused.headers().get("retry-after").is_some(), "{host}: a 503 says when to retry");
        let body: Value = refused.json().await.unwrap();
        assert!(body["detail"].as_str().unwrap().contains(host), "{body}");
    }
    let list: Value = app.get_as(KEY_A, "/v1/subscriptions").await.json().await.unwrap();
    assert_eq!(list["items"].as_array().map(Vec::len), Some(0), "nothing was registered: {list}");
}

#[tokio::test]
async fn a_callback_host_that_does_not_exist_or_is_not_public_gets_one_refusal() {
    let app = spawn_app_with(with_scripted_dns()).await;
    let mut details = Vec::new();
    for host in ["missing.test", "loopback.test", "private.test"] {
        let refused = app.register_as(KEY_A, &new_job(), &format!("https://{host}/hook")).await;
        assert_eq!(refused.status(), 422, "{host}");
        let body: Value = refused.json().await.unwrap();
        details.push(body["detail"].as_str().unwrap().replace(host, "HOST"));
    }
    assert!(details.iter().all(|d| *d == details[0]), "a caller can tell the cases apart: {details:#?}");
    // A literal address names nothing the caller does not know: it keeps the precise reason.
    let literal = app.register_as(KEY_A, &new_job(), "https://127.0.0.1/hook").await;
    assert_eq!(literal.status(), 422);
    let body: Value = literal.json().await.unwrap();
    assert!(body["detail"].as_str().unwrap().contains("loopback"), "{body}");
}

#[tokio::test]
async fn an_allowed_cidr_admits_internal_receivers_and_nothing_else() {
    let settings =
        Settings::default().arg("--allow-private-callbacks", "false").arg("--callback-allow-cidrs", "127.0.0.0/8");
    let app = spawn_app_with(settings).await;
    let sub = app.register(&new_job(), &app.receiver.url("/internal")).await;
    app.wait_for_state(sub["id"].as_str().unwrap(), "delivered").await;
    let refused = app.register_as(KEY_A, &new_job(), "http://10.0.0.1/hook").await;
    assert_eq!(refused.status(), 422);
}

#[tokio::test]
async fn https_only_refuses_plain_http_callbacks() {
    let app = spawn_app_with(Settings::default().arg("--callback-https-only", "true")).await;
    let refused = app.register_as(KEY_A, &new_job(), &app.receiver.url("/hook")).await;
    assert_eq!(refused.status(), 422);
    let body: Value = refused.json().await.unwrap();
    assert!(body["detail"].as_str().unwrap().contains("https"), "{body}");
}

#[tokio::test]
async fn an_upstream_that_rejects_our_key_never_sees_it_leak() {
    let mock = MockArgs { api_key: Some("the-upstream-key-0123456789".into()), ..mock_args(1) };
    let app = spawn_app_with(Settings::mock(mock).arg("--upstream-api-key", "wrong-upstream-key-0123456789")).await;
    let sub = app.register(&new_job(), &app.receiver.url("/hook")).await;
    let done = app.wait_for_state(sub["id"].as_str().unwrap(), "failed").await;
    assert_eq!(done["failure_reason"], "upstream_unauthorized");
    assert!(!done.to_string().contains("0123456789"));
}

/// A client that sends its registration and hangs up at once (a timeout, a killed process) must not
/// leave a stored subscription unpolled: whatever was committed is polled and delivered. The server
/// drops a request's handler when its client goes away, so the work after the commit must not live in
/// that handler alone.
#[tokio::test]
async fn a_client_that_hangs_up_mid_registration_leaves_no_stored_job_behind() {
    use tokio::io::AsyncWriteExt;
    const CLIENTS: usize = 100;
    let app = spawn_app_with(Settings::mock(mock_args(0))).await;
    let mut hangups = tokio::task::JoinSet::new();
    for _ in 0..CLIENTS {
        let (addr, callback) = (app.addr, app.receiver.url("/hook"));
        hangups.spawn(async move {
            let body = serde_json::json!({ "job_id": new_job(), "callback_url": callback }).to_string();
            let request = format!(
                "POST /v1/subscriptions HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {KEY_A}\r\n\
                 content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            stream.write_all(request.as_bytes()).await.unwrap();
            // Give the request a moment to reach the store, then hang up while it is under way.
            tokio::time::sleep(Duration::from_micros(rand::random_range(0..40_000))).await;
        });
    }
    while hangups.join_next().await.is_some() {}
    // A registration after them all: once it is answered, theirs have been written or dropped.
    app.register(&new_job(), &app.receiver.url("/hook")).await;
    let stored: Vec<Value> =
        app.get_as(KEY_A, "/v1/subscriptions?limit=500").await.json::<Value>().await.unwrap()["items"]
            .as_array()
            .unwrap()
            .clone();
    eprintln!("hang-ups: {} of {CLIENTS} registrations were stored before the client left", stored.len() - 1);
    for sub in &stored {
        app.wait_for_state(sub["id"].as_str().unwrap(), "delivered").await;
    }
}

/// Slow clients cannot hold the API: headers that never end close the connection, a body that never
/// arrives is answered 408, and a declared length over the limit is refused before any body is awaited.
#[tokio::test]
async fn slow_and_oversized_requests_are_cut_off_with_a_clear_answer() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = spawn_app_with(Settings::default().arg("--request-timeout", "1s")).await;
    let exchange = |request: String| async move {
        let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        // The deadline is the test's: the server must answer or close well before it.
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
            .await
            .expect("the server answers or closes the connection")
            .unwrap();
        String::from_utf8_lossy(&answer).into_owned()
    };
    let started = Instant::now();
    let answer = exchange("GET /healthz HTTP/1.1\r\nhost: x\r\n".into()).await;
    assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 408"), "unfinished headers: {answer}");
    assert!(started.elapsed() < Duration::from_secs(5));

    let post = |length: usize| {
        format!(
            "POST /v1/subscriptions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY_A}\r\n\
             content-type: application/json\r\ncontent-length: {length}\r\n\r\n{{}}"
        )
    };
    let answer = exchange(post(100_000_000)).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("application/problem+json"), "{answer}");
    let answer = exchange(post(100)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("did not arrive within 1s"), "{answer}");
}

/// Idle clients cannot open connections without bound: past `--max-connections` a new connection waits
/// (unanswered, in the listen queue) until an open one closes, and is then served.
#[tokio::test]
async fn connections_past_the_cap_wait_until_one_closes() {
    let app = spawn_app_with(Settings::default().arg("--max-connections", "20")).await;
    let mut idle = Vec::new();
    for _ in 0..20 {
        idle.push(tokio::net::TcpStream::connect(app.addr).await.unwrap());
    }
    // The cap is full: a request on a new connection is not answered while it stays full. (Absence
    // cannot be awaited: this gives it a second, far more than a loopback request needs.)
    let client = reqwest::Client::builder().timeout(Duration::from_secs(1)).build().unwrap();
    let refused = client.get(app.url("/healthz")).send().await;
    assert!(refused.is_err_and(|e| e.is_timeout()), "a connection past the cap was served");
    // One idle client leaves: the next connection is served.
    drop(idle.pop());
    let waited = eventually(Duration::from_secs(10), "a connection to be served once one closed", || async {
        client.get(app.url("/healthz")).send().await.ok()
    })
    .await;
    assert_eq!(waited.status(), 200);
}

#[tokio::test]
async fn one_tenants_tarpits_on_many_host_names_cannot_take_every_delivery_slot() {
    // Tenant A's 300 deliveries go to 30 host names that all lead to a receiver that never answers;
    // 300 slots overall, so without a per-tenant cap (default 256) A would hold them all for 30 s.
    let dead = RawReceiver::start("127.0.0.2", Misbehaviour::Hang).await;
    let port = dead.addr.port();
    let tarpits: Lookup = Arc::new(move |host: String, _: u16| {
        Box::pin(async move {
            match host.ends_with(".tarpit.test") {
                true => Ok(vec![format!("127.0.0.2:{port}").parse().unwrap()]),
                false => Err(std::io::Error::other("no such host")),
            }
        })
    });
    let settings = Settings { lookup: Some(tarpits), ..Settings::default() }
        .arg("--delivery-timeout", "30s")
        .arg("--delivery-concurrency", "300");
    let app = spawn_app_with(settings).await;
    for i in 0..300 {
        app.register(&new_job(), &format!("http://h{}.tarpit.test:{port}/hook", i % 30)).await;
    }
    eventually(Duration::from_secs(15), "tenant A's tarpits to hold its slots", || async {
        (dead.connections.load(Ordering::SeqCst) >= 256).then_some(())
    })
    .await;
    let started = Instant::now();
    for i in 0..60 {
        let response = app.register_as(KEY_B, &new_job(), &app.receiver.url(&format!("/b/{i}"))).await;
        assert_eq!(response.status(), 201);
    }
    eventually(Duration::from_secs(5), "tenant B's 60 deliveries", || async {
        (app.receiver.requests().iter().filter(|r| r.path.starts_with("/b/")).count() == 60).then_some(())
    })
    .await;
    eprintln!("tenant isolation: B's 60 deliveries in {:?} beside A's 300 hanging ones", started.elapsed());
    let open = dead.connections.load(Ordering::SeqCst);
    assert!(open <= 256, "tenant A held {open} connections, more than its cap");
}
