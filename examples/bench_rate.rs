//! Constant-rate load generator for `benches/e2e.sh` (wrk2-style): sends
//! RATE requests per second in total over CONNS keep-alive HTTP/1.1
//! connections for SECS seconds and prints latency percentiles.
//!
//! Latency is measured from the request's scheduled send time whenever the
//! connection was still busy with the previous response at that time
//! (coordinated omission corrected), else from the actual send time (so
//! this process's own 1 ms timer granularity is not charged to the server).
//!
//! Usage: `bench_rate URL RATE SECS CONNS [HEADER: VALUE]...`
//! Prints one line: `rate_ok=… p50_us=… p90_us=… p99_us=… p999_us=… max_us=… errors=…`.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Uri};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

struct Conn {
    latencies_us: Vec<u32>,
    errors: u64,
}

async fn run_conn(
    uri: Uri,
    headers: Vec<(HeaderName, HeaderValue)>,
    start: tokio::time::Instant,
    offset: Duration,
    every: Duration,
    until: tokio::time::Instant,
) -> anyhow::Result<Conn> {
    let authority = uri.authority().expect("URL has a host").clone();
    let stream = TcpStream::connect(authority.as_str()).await?;
    stream.set_nodelay(true)?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut out = Conn {
        latencies_us: Vec::new(),
        errors: 0,
    };
    let mut k: u32 = 0;
    loop {
        let intended = start + offset + every * k;
        if intended >= until {
            break;
        }
        k += 1;
        let now = tokio::time::Instant::now();
        let t0 = if now > intended {
            // Busy with the previous response: charge the wait.
            intended.into_std()
        } else {
            tokio::time::sleep_until(intended).await;
            Instant::now()
        };
        let mut req = Request::get(uri.clone())
            .header(http::header::HOST, authority.as_str())
            .body(Empty::<Bytes>::new())?;
        for (n, v) in &headers {
            req.headers_mut().insert(n.clone(), v.clone());
        }
        send.ready().await?;
        match send.send_request(req).await {
            Ok(resp) => {
                let ok = resp.status().is_success();
                let _ = resp.into_body().collect().await;
                let us = t0.elapsed().as_micros().min(u32::MAX as u128) as u32;
                out.latencies_us.push(us);
                if !ok {
                    out.errors += 1;
                }
            }
            Err(_) => {
                out.errors += 1;
                break;
            }
        }
    }
    Ok(out)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    anyhow::ensure!(
        args.len() >= 4,
        "usage: bench_rate URL RATE SECS CONNS [HEADER: VALUE]..."
    );
    let uri: Uri = args[0].parse()?;
    let rate: f64 = args[1].parse()?;
    let secs: f64 = args[2].parse()?;
    let conns: u32 = args[3].parse()?;
    let mut headers = Vec::new();
    for h in &args[4..] {
        let (n, v) = h.split_once(':').expect("HEADER: VALUE");
        headers.push((
            HeaderName::from_bytes(n.trim().as_bytes())?,
            HeaderValue::from_str(v.trim())?,
        ));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let every = Duration::from_secs_f64(conns as f64 / rate);
        // One warm-up request per connection is not counted: start 200 ms out.
        let start = tokio::time::Instant::now() + Duration::from_millis(200);
        let until = start + Duration::from_secs_f64(secs);
        let mut tasks = Vec::new();
        for c in 0..conns {
            let offset = every * c / conns;
            tasks.push(tokio::spawn(run_conn(
                uri.clone(),
                headers.clone(),
                start,
                offset,
                every,
                until,
            )));
        }
        let mut all = Vec::new();
        let mut errors = 0;
        for t in tasks {
            match t.await? {
                Ok(c) => {
                    all.extend(c.latencies_us);
                    errors += c.errors;
                }
                Err(e) => {
                    eprintln!("connection failed: {e}");
                    errors += 1;
                }
            }
        }
        all.sort_unstable();
        let pct = |p: f64| -> u32 {
            if all.is_empty() {
                return 0;
            }
            let i = ((p / 100.0) * all.len() as f64).ceil() as usize;
            all[i.clamp(1, all.len()) - 1]
        };
        println!(
            "rate_ok={:.0} p50_us={} p90_us={} p99_us={} p999_us={} max_us={} errors={}",
            all.len() as f64 / secs,
            pct(50.0),
            pct(90.0),
            pct(99.0),
            pct(99.9),
            all.last().copied().unwrap_or(0),
            errors
        );
        Ok(())
    })
}
