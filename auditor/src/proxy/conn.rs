//! Accepting redirected connections and moving their bytes: one task per direction, the
//! [`Relay`] between them. Reads wait while the other side is written to (backpressure);
//! the two directions never wait on each other, so a server streaming results while the
//! client pipelines requests cannot deadlock the proxy.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use auditor_common::{
    OrigDst, RecordHeader, Tuple, AF_INET, AF_INET6, DIR_TO_CLIENT, DIR_TO_SERVER, RECORD_CLOSE,
    RECORD_DATA, RECORD_OPEN, ROLE_CLIENT, SEEN_CONNECT, STREAM_PROXY,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::Mutex as AsyncMutex,
};

use super::{netns::Place, relay::Relay, ProxyRecord, Shared};
use crate::pg::{GSSENC_REQUEST_CODE, SSL_REQUEST_CODE};
use crate::{
    audit::event::ProcessIdentity,
    conversation::SessionMeta,
    pg::backend::encode_error,
    policy::{Applied, Subject},
    workload::{LabelSource, ProcessLabels},
};

/// How long a connection waits for its server's TCP handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How old a redirected connection's record may be when the proxy accepts it.
const ORIGIN_MAX_AGE: Duration = Duration::from_secs(30);
/// How long a new cgroup's labels may take to appear (the main loop looks every second).
const LABELS_WAIT: Duration = Duration::from_millis(1500);

pub async fn accept_loop(
    listener: TcpListener,
    place: Arc<Place>,
    shared: Arc<Shared>,
    workers: Arc<super::Workers>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                tcp_keepalive(&stream);
                workers.dispatch(stream, peer, place.clone(), shared.clone());
            }
            Err(e) => {
                // EMFILE and the like: back off rather than spin.
                tracing::warn!("proxy accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// TCP keepalives on a proxied connection (a statement held for approval leaves it quiet
/// for minutes; middleboxes drop quiet connections): probes after 60 s idle, every 15 s,
/// given up after 4.
fn tcp_keepalive(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let fd = s.as_raw_fd();
    let set = |level: libc::c_int, name: libc::c_int, v: libc::c_int| {
        // SAFETY: setsockopt on a socket we own, with a c_int value of the size passed.
        unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        }
    };
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 60);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 15);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 4);
}

pub(crate) fn fatal(message: &str, sqlstate: &str) -> Vec<u8> {
    let mut out = Vec::new();
    encode_error(&mut out, false, "FATAL", sqlstate, message, &[]);
    out
}

fn addr_of(orig: &OrigDst) -> SocketAddr {
    let v6 = Ipv6Addr::from(orig.addr);
    let ip = match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    };
    SocketAddr::new(ip, orig.port)
}

/// What the records of one proxied connection share.
pub(super) struct Recorder {
    records: std::sync::mpsc::Sender<ProxyRecord>,
    template: RecordHeader,
    offsets: [u64; 2],
}

impl Recorder {
    fn send(&mut self, kind: u32, direction: u8, data: &[u8]) {
        let mut h = self.template;
        h.kind = kind;
        h.ts_ns = crate::tracker::monotonic_ns();
        h.direction = direction;
        match kind {
            RECORD_DATA => {
                let d = (direction & 1) as usize;
                h.offset = self.offsets[d];
                h.len = data.len() as u32;
                h.call_len = data.len() as u64;
                self.offsets[d] += data.len() as u64;
            }
            RECORD_CLOSE => {
                h.offset = self.offsets[0];
                h.call_len = self.offsets[1];
            }
            _ => {}
        }
        let _ = self.records.send(ProxyRecord {
            header: h,
            data: data.to_vec(),
        });
    }

    /// Bytes the relay has for the client, with what was masked in each result that ended
    /// in them recorded just before the message that ended it.
    fn record_to_client(&mut self, data: &[u8], tallies: &mut Vec<(usize, Vec<u8>)>) {
        let mut at = 0;
        for (end, tally) in tallies.drain(..) {
            let end = end.clamp(at, data.len());
            if end > at {
                self.send(RECORD_DATA, DIR_TO_CLIENT, &data[at..end]);
                at = end;
            }
            self.send(super::RECORD_MASKED, DIR_TO_CLIENT, &tally);
        }
        if at < data.len() {
            self.send(RECORD_DATA, DIR_TO_CLIENT, &data[at..]);
        }
    }

    /// A note on a held statement, in the session's stream (see `approvals::Note`).
    pub(super) fn note(&mut self, note: &crate::approvals::Note) {
        if let Ok(data) = serde_json::to_vec(note) {
            self.send(super::RECORD_NOTE, DIR_TO_CLIENT, &data);
        }
    }
}

/// The relay and the connection's records, behind one lock (taken per read, never across
/// an await).
pub(super) struct Conn {
    pub relay: Relay,
    pub recorder: Recorder,
}

pub(super) async fn handle(
    client: TcpStream,
    peer: SocketAddr,
    place: Arc<Place>,
    shared: Arc<Shared>,
) {
    shared.counters.connections.fetch_add(1, Ordering::Relaxed);
    shared.counters.active.fetch_add(1, Ordering::Relaxed);
    let ended = Ended(shared.clone());
    let orig = shared.maps.lock().ok().and_then(|mut m| {
        m.take_origin(peer.port(), place.cookie)
            // Records of the programs of a daemon before this one, which kept no
            // namespace (taken over at start).
            .or_else(|| place.host.then(|| m.take_origin(peer.port(), 0)).flatten())
    });
    // A record left by a connection the proxy never accepted (the daemon was down) is
    // stale: never taken for a later connection from the same port.
    let orig = orig.filter(|o| {
        crate::tracker::monotonic_ns().saturating_sub(o.ts_ns) < ORIGIN_MAX_AGE.as_nanos() as u64
    });
    let Some(orig) = orig else {
        shared
            .counters
            .unknown_origin
            .fetch_add(1, Ordering::Relaxed);
        let mut client = client;
        let _ = client
            .write_all(&fatal(
                "auditor proxy: this port only takes connections the auditor redirected",
                "08004",
            ))
            .await;
        drop(ended);
        return;
    };
    let dest = addr_of(&orig);
    match connect_upstream(&shared, &place, dest).await {
        Ok((server, local, netns)) => {
            relay(client, peer, server, orig, dest, shared.clone()).await;
            if let Ok(mut m) = shared.maps.lock() {
                m.remove_upstream(local, netns);
            }
        }
        Err(e) => {
            shared
                .counters
                .upstream_failures
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                "proxy: cannot reach {dest} for pid {}: {e}",
                orig.pid_tgid >> 32
            );
            let mut client = client;
            let _ = client
                .write_all(&fatal(
                    &format!("auditor proxy: cannot reach the server at {dest}: {e}"),
                    "08006",
                ))
                .await;
        }
    }
    drop(ended);
}

struct Ended(Arc<Shared>);

impl Drop for Ended {
    fn drop(&mut self) {
        self.0.counters.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Connects to the server from a source address and port registered first, so that the
/// capture never takes this connection's server end for a client's.
async fn connect_upstream(
    shared: &Shared,
    place: &Place,
    dest: SocketAddr,
) -> std::io::Result<(TcpStream, SocketAddr, u32)> {
    let (socket, local) = place.upstream_socket(dest).await?;
    // A loopback address is told apart by its namespace, as the capture tells it.
    let netns = if local.ip().is_loopback() && shared.netns_known {
        place.inum
    } else {
        0
    };
    shared
        .maps
        .lock()
        .map_err(|_| std::io::Error::other("redirect maps poisoned"))?
        .add_upstream(local, netns)
        .map_err(std::io::Error::other)?;
    match tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(dest)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            tcp_keepalive(&s);
            Ok((s, local, netns))
        }
        Ok(Err(e)) => {
            if let Ok(mut m) = shared.maps.lock() {
                m.remove_upstream(local, netns);
            }
            Err(e)
        }
        Err(_) => {
            if let Ok(mut m) = shared.maps.lock() {
                m.remove_upstream(local, netns);
            }
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connect timed out",
            ))
        }
    }
}

fn v6_bytes(a: SocketAddr) -> [u8; 16] {
    match a.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// Labels of the client's cgroup (from the main loop), then of its process.
async fn labels_of(shared: &Shared, identity: &ProcessIdentity) -> BTreeMap<String, String> {
    let deadline = tokio::time::Instant::now() + LABELS_WAIT;
    let mut labels = loop {
        let found = shared
            .cgroup_labels
            .lock()
            .ok()
            .and_then(|m| m.get(&identity.cgroup_id).cloned());
        if let Some(l) = found {
            break (*l).clone();
        }
        if tokio::time::Instant::now() >= deadline {
            // Not seen yet: what the cgroup path says.
            let mut l = BTreeMap::new();
            crate::workload::CgroupLabels.add_labels(identity, &mut l);
            break l;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    ProcessLabels.add_labels(identity, &mut labels);
    labels
}

async fn relay(
    client: TcpStream,
    peer: SocketAddr,
    server: TcpStream,
    orig: OrigDst,
    dest: SocketAddr,
    shared: Arc<Shared>,
) {
    let tgid = (orig.pid_tgid >> 32) as u32;
    let comm = {
        let end = orig.comm.iter().position(|&b| b == 0).unwrap_or(16);
        String::from_utf8_lossy(&orig.comm[..end]).into_owned()
    };
    let identity = crate::workload::IdentityResolver::new().resolve(
        tgid,
        &comm,
        orig.uid_gid as u32,
        orig.cgroup_id,
        Default::default(),
    );
    let labels = Arc::new(labels_of(&shared, &identity).await);
    let origin = super::hold::Origin {
        identity: identity.clone(),
        labels: labels.clone(),
        client: peer,
        server: dest,
    };
    let policies = shared
        .policies
        .lock()
        .map(|p| p.clone())
        .unwrap_or_default();
    let defaults = shared.defaults;
    let client_ip = peer.ip();
    let resolver = Box::new(move |meta: &SessionMeta| -> Arc<Applied> {
        Arc::new(policies.resolve(
            &Subject {
                labels: &labels,
                db_user: &meta.db_user,
                database: &meta.database,
                application_name: &meta.application_name,
                client_addr: Some(client_ip),
                server_addr: Some(dest.ip()),
                server_port: dest.port(),
            },
            defaults,
        ))
    });
    let family = if orig.family == AF_INET6 && !dest.is_ipv4() {
        AF_INET6
    } else {
        AF_INET
    };
    let template = RecordHeader {
        sock: shared.next_id(),
        conn_start_ns: crate::tracker::monotonic_ns(),
        pid_tgid: orig.pid_tgid,
        uid_gid: orig.uid_gid,
        cgroup_id: orig.cgroup_id,
        comm: orig.comm,
        tuple: Tuple {
            local_addr: v6_bytes(peer),
            remote_addr: orig.addr,
            local_port: peer.port(),
            remote_port: orig.port,
            family,
            ..Tuple::default()
        },
        role: ROLE_CLIENT,
        seen: SEEN_CONNECT,
        stream: STREAM_PROXY,
        ..RecordHeader::default()
    };
    let Some(records) = shared.records.lock().ok().map(|tx| tx.clone()) else {
        return;
    };
    let mut recorder = Recorder {
        records,
        template,
        offsets: [0, 0],
    };
    recorder.send(RECORD_OPEN, DIR_TO_SERVER, &[]);
    let mut relay = Relay::new(shared.limits, shared.budget.clone(), resolver);
    let secrets = shared.secrets.clone();
    relay.password_of = Arc::new(move |c| super::login::read_password(c, &secrets));
    relay.mask_key = shared.mask_key.clone();
    let conn = Arc::new(std::sync::Mutex::new(Conn { relay, recorder }));
    let Some((mut client_rd, client_wr, mut server_rd, server_wr)) =
        negotiate(&conn, client, server, shared.tls.as_deref(), dest).await
    else {
        if let Ok(mut c) = conn.lock() {
            c.recorder.send(RECORD_CLOSE, DIR_TO_SERVER, &[]);
        }
        return;
    };
    let client_wr = Arc::new(AsyncMutex::new(client_wr));
    // Written from both directions: the client's requests, and the proxy's own answers
    // to the server's authentication requests (a credential's login).
    let server_wr = Arc::new(AsyncMutex::new(server_wr));

    // Holds the other direction began (replaying requests held before the session was
    // ready): the client direction waits on them.
    let (opened_tx, mut opened_rx) =
        tokio::sync::mpsc::unbounded_channel::<super::hold::ActiveHold>();
    let origin = Arc::new(origin);

    // Client -> server.
    let c2s = {
        let conn = conn.clone();
        let client_wr = client_wr.clone();
        let server_wr = server_wr.clone();
        let shared = shared.clone();
        let origin = origin.clone();
        async move {
            let mut buf = vec![0u8; 64 * 1024];
            let mut enforced_counted = false;
            let mut stop = shared.stop.subscribe();
            let mut hold: Option<super::hold::ActiveHold> = None;
            let mut keepalive = tokio::time::interval(super::hold::KEEPALIVE);
            keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            enum Wake {
                Read(usize),
                Verdict(Option<crate::approvals::Verdict>),
                Expired,
                Keepalive,
                Canceled,
                Opened(Box<super::hold::ActiveHold>),
            }
            loop {
                if *stop.borrow() {
                    // The daemon stops: no new request goes out; the server ends the
                    // session after answering those in flight (recorded by the other
                    // direction), so nothing runs unrecorded. A held statement is
                    // withdrawn, and its client told.
                    if let Some(mut h) = hold.take() {
                        if let Ok(mut c) = conn.lock() {
                            h.abandon(&mut c, "the auditor daemon is stopping");
                        }
                        let _ = flush_client(&conn, &client_wr).await;
                    }
                    let _ = write_flush(&mut *server_wr.lock().await, &[b'X', 0, 0, 0, 4]).await;
                    break;
                }
                let reading = hold.is_none()
                    || conn
                        .lock()
                        .map(|c| c.relay.held_bytes() < super::hold::MAX_HELD_BYTES)
                        .unwrap_or(false);
                let deadline = hold
                    .as_ref()
                    .map(|h| h.deadline)
                    .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
                let cancel = hold.as_ref().map(|h| h.cancel.clone());
                let wake = tokio::select! {
                    r = client_rd.read(&mut buf), if reading => match r {
                        Ok(0) | Err(_) => break,
                        Ok(n) => Wake::Read(n),
                    },
                    _ = stop.changed() => continue,
                    v = async { (&mut hold.as_mut().expect("guarded").rx).await }, if hold.is_some() => Wake::Verdict(v.ok()),
                    _ = tokio::time::sleep_until(deadline), if hold.is_some() => Wake::Expired,
                    _ = keepalive.tick(), if hold.is_some() => Wake::Keepalive,
                    _ = async { cancel.as_ref().expect("guarded").notified().await }, if cancel.is_some() => Wake::Canceled,
                    Some(h) = opened_rx.recv() => Wake::Opened(Box::new(h)),
                };
                let (to_server, to_client, close) = {
                    let Ok(mut c) = conn.lock() else { break };
                    match wake {
                        Wake::Read(n) => {
                            let Conn { relay, recorder } = &mut *c;
                            recorder.send(RECORD_DATA, DIR_TO_SERVER, &buf[..n]);
                            relay.on_client(&buf[..n]);
                            if let Some(k) = relay.cancel_of.take() {
                                // A cancel for a session whose statement is held.
                                if let Some(n) =
                                    shared.cancels.lock().ok().and_then(|m| m.get(&k).cloned())
                                {
                                    n.notify_one();
                                }
                            }
                            if relay.enforcing() && !enforced_counted {
                                enforced_counted = true;
                                shared
                                    .counters
                                    .enforced_sessions
                                    .fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Wake::Verdict(v) => {
                            if let Some(mut h) = hold.take() {
                                h.decided(&mut c, v);
                            }
                        }
                        Wake::Expired => {
                            if let Some(h) = hold.as_mut() {
                                if h.expire(&mut c) {
                                    hold = None;
                                }
                            }
                        }
                        Wake::Keepalive => c.relay.keepalive(),
                        Wake::Canceled => {
                            if let Some(h) = hold.as_mut() {
                                if h.canceled(&mut c) {
                                    hold = None;
                                }
                            }
                        }
                        Wake::Opened(h) => hold = Some(*h),
                    }
                    for r in c.relay.refused.drain(..) {
                        if r.headline.is_some() {
                            continue; // a held statement's end, counted by the hub
                        }
                        shared.counters.blocked.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(
                            pid = tgid,
                            policy = %r.decision.policy,
                            rule = %r.decision.rule,
                            "proxy: statement blocked"
                        );
                    }
                    if hold.is_none() {
                        hold = super::hold::open(&mut c, &conn, &shared, &origin);
                        if hold.is_some() {
                            shared.counters.held.fetch_add(1, Ordering::Relaxed);
                            keepalive.reset();
                        }
                    }
                    (
                        std::mem::take(&mut c.relay.to_server),
                        !c.relay.to_client.is_empty(),
                        c.relay.close.is_some(),
                    )
                };
                // Bytes for the client from this direction (the answer to an encryption
                // request, a fatal error, a held statement's notices and refusals),
                // taken in turn with the other direction's (see `flush_client`).
                if to_client && flush_client(&conn, &client_wr).await.is_err() {
                    break;
                }
                if close {
                    break;
                }
                if !to_server.is_empty()
                    && write_flush(&mut *server_wr.lock().await, &to_server)
                        .await
                        .is_err()
                {
                    break;
                }
            }
            drop(hold);
            let _ = server_wr.lock().await.shutdown().await;
        }
    };
    // Server -> client.
    let s2c = {
        let conn = conn.clone();
        let client_wr = client_wr.clone();
        let server_wr = server_wr.clone();
        let shared = shared.clone();
        let origin = origin.clone();
        async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match server_rd.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                // The client's writer first: bytes for the client are taken from the
                // relay and written in the same order by both directions.
                let mut w = client_wr.lock().await;
                let (to_client, to_server, close, opened) = {
                    let Ok(mut c) = conn.lock() else { break };
                    c.relay.on_server(&buf[..n]);
                    if c.relay.masked_values > 0 {
                        shared.counters.masked_values.fetch_add(
                            std::mem::take(&mut c.relay.masked_values),
                            Ordering::Relaxed,
                        );
                    }
                    // Requests held until the session was ready may begin a hold.
                    let opened = if c.relay.hold_asked.is_some() {
                        super::hold::open(&mut c, &conn, &shared, &origin)
                    } else {
                        None
                    };
                    let Conn { relay, recorder } = &mut *c;
                    let to_client = std::mem::take(&mut relay.to_client);
                    recorder.record_to_client(&to_client, &mut relay.mask_tallies);
                    // The proxy's own login answers (never recorded), requests held
                    // while the session started.
                    let to_server = std::mem::take(&mut relay.to_server);
                    (to_client, to_server, relay.close.is_some(), opened)
                };
                if let Some(h) = opened {
                    shared.counters.held.fetch_add(1, Ordering::Relaxed);
                    let _ = opened_tx.send(h);
                }
                if !to_server.is_empty()
                    && write_flush(&mut *server_wr.lock().await, &to_server)
                        .await
                        .is_err()
                {
                    break;
                }
                if !to_client.is_empty() && write_flush(&mut w, &to_client).await.is_err() {
                    break;
                }
                drop(w);
                if close {
                    break;
                }
            }
            let _ = client_wr.lock().await.shutdown().await;
        }
    };
    // The session ends when the server's side does (after the client's Terminate, its
    // close, or the daemon's stop): every answer to what was sent is recorded first.
    let mut c2s = Box::pin(c2s);
    let mut s2c = Box::pin(s2c);
    tokio::select! {
        _ = &mut s2c => {}
        _ = &mut c2s => {
            // The client is done sending; the server answers what is in flight, then
            // closes (or the client's going away is all there is).
            let _ = tokio::time::timeout(Duration::from_secs(30), &mut s2c).await;
        }
    }
    // A statement still held is withdrawn (noted) before the session's close.
    drop(c2s);
    drop(s2c);
    let closing = conn.lock();
    if let Ok(mut c) = closing {
        c.recorder.send(RECORD_CLOSE, DIR_TO_SERVER, &[]);
    }
}

/// Writes what the relay has for the client, taken under the client's writer (so that
/// the two directions' bytes reach the client in the order the relay produced them).
async fn flush_client(
    conn: &std::sync::Mutex<Conn>,
    client_wr: &AsyncMutex<Writer>,
) -> std::io::Result<()> {
    let mut w = client_wr.lock().await;
    let to_client = {
        let Ok(mut c) = conn.lock() else {
            return Err(std::io::Error::other("connection state poisoned"));
        };
        let Conn { relay, recorder } = &mut *c;
        let to_client = std::mem::take(&mut relay.to_client);
        recorder.record_to_client(&to_client, &mut relay.mask_tallies);
        to_client
    };
    if to_client.is_empty() {
        return Ok(());
    }
    write_flush(&mut w, &to_client).await
}

type Reader = Box<dyn tokio::io::AsyncRead + Send + Unpin>;
type Writer = Box<dyn tokio::io::AsyncWrite + Send + Unpin>;

async fn write_flush(w: &mut Writer, data: &[u8]) -> std::io::Result<()> {
    w.write_all(data).await?;
    // TLS holds what it encrypted until flushed; TCP has nothing to flush.
    w.flush().await
}

fn halves<S>(s: S) -> (Reader, Writer)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (r, w) = tokio::io::split(s);
    (Box::new(r), Box::new(w))
}

/// How long a client may take to send its first packets.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// The first byte of a TLS handshake record (a ClientHello sent without SSLRequest).
const TLS_HANDSHAKE: u8 = 0x16;

/// The client's bytes given to the relay, its answer written (the encryption requests
/// the proxy answers itself, and the start of the startup packet).
async fn feed(
    conn: &std::sync::Mutex<Conn>,
    client: &mut TcpStream,
    server: &mut TcpStream,
    data: &[u8],
) -> Option<()> {
    let (to_server, to_client, close) = {
        let mut c = conn.lock().ok()?;
        let Conn { relay, recorder } = &mut *c;
        recorder.send(RECORD_DATA, DIR_TO_SERVER, data);
        relay.on_client(data);
        let to_client = std::mem::take(&mut relay.to_client);
        recorder.record_to_client(&to_client, &mut relay.mask_tallies);
        (
            std::mem::take(&mut relay.to_server),
            to_client,
            relay.close.is_some(),
        )
    };
    client.write_all(&to_client).await.ok()?;
    if close {
        return None;
    }
    server.write_all(&to_server).await.ok()
}

/// The encryption phase. Without `proxy.tls` the relay answers the client's requests
/// itself (`N`). With it, a client's SSLRequest goes to the server first: if the server
/// accepts TLS, the proxy accepts the client's (its certificate) and speaks TLS to the
/// server; if not, the client gets the server's `N`, as without the proxy. Returns the
/// two connections' halves, plaintext to the relay; None if the connection ended.
async fn negotiate(
    conn: &std::sync::Mutex<Conn>,
    mut client: TcpStream,
    mut server: TcpStream,
    tls: Option<&super::tls::ProxyTls>,
    dest: SocketAddr,
) -> Option<(Reader, Writer, Reader, Writer)> {
    let plain = |client: TcpStream, server: TcpStream| {
        let (cr, cw) = client.into_split();
        let (sr, sw) = server.into_split();
        Some((
            Box::new(cr) as Reader,
            Box::new(cw) as Writer,
            Box::new(sr) as Reader,
            Box::new(sw) as Writer,
        ))
    };
    let Some(tls) = tls else {
        return plain(client, server);
    };
    // Postgres 17's direct TLS: a ClientHello first, no SSLRequest before it. The server
    // leg is TLS negotiated the classic way (any server version with TLS); a server
    // without TLS would have refused the client too: the connection is closed.
    let mut first = [0u8; 1];
    match tokio::time::timeout(STARTUP_TIMEOUT, client.peek(&mut first)).await {
        Ok(Ok(1)) => {}
        _ => return None,
    }
    if first[0] == TLS_HANDSHAKE {
        if !server_accepts_tls(&mut server).await? {
            tracing::info!("proxy: a client opened with TLS directly, and the server at {dest} does not accept TLS");
            return None;
        }
        return both_tls(conn, client, server, tls, dest).await;
    }
    loop {
        let mut head = [0u8; 8];
        match tokio::time::timeout(STARTUP_TIMEOUT, client.read_exact(&mut head)).await {
            Ok(Ok(_)) => {}
            _ => return None,
        }
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        let code = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
        if len == 8 && code == SSL_REQUEST_CODE {
            // What would the server have said?
            if server_accepts_tls(&mut server).await? {
                client.write_all(b"S").await.ok()?;
                return both_tls(conn, client, server, tls, dest).await;
            }
            // The server's N (the relay answers the client the same), then the startup.
            feed(conn, &mut client, &mut server, &head).await?;
            continue;
        }
        feed(conn, &mut client, &mut server, &head).await?;
        if len == 8 && code == GSSENC_REQUEST_CODE {
            continue;
        }
        return plain(client, server);
    }
}

/// Puts an SSLRequest to the server: whether it answered `S` (None: it did not answer).
async fn server_accepts_tls(server: &mut TcpStream) -> Option<bool> {
    let mut request = Vec::with_capacity(8);
    crate::pg::frontend::FrontendMessage::SslRequest.encode(&mut request);
    server.write_all(&request).await.ok()?;
    let mut answer = [0u8; 1];
    tokio::time::timeout(CONNECT_TIMEOUT, server.read_exact(&mut answer))
        .await
        .ok()?
        .ok()?;
    Some(answer[0] == b'S')
}

/// TLS on both legs: the client's accepted with the proxy's certificate, the server's
/// (which accepted an SSLRequest) originated by the proxy.
async fn both_tls(
    conn: &std::sync::Mutex<Conn>,
    client: TcpStream,
    server: TcpStream,
    tls: &super::tls::ProxyTls,
    dest: SocketAddr,
) -> Option<(Reader, Writer, Reader, Writer)> {
    let client = match tls.acceptor.accept(client).await {
        Ok(c) => c,
        Err(e) => {
            tracing::info!("proxy: a client's TLS handshake failed: {e}");
            return None;
        }
    };
    let name = tls
        .server_name
        .clone()
        .unwrap_or_else(|| rustls::pki_types::ServerName::IpAddress(dest.ip().into()));
    let server = match tls.connector.connect(name, server).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("proxy: TLS to the server at {dest} failed: {e}");
            let (_, mut w) = tokio::io::split(client);
            let _ = w
                .write_all(&fatal(
                    &format!("auditor proxy: TLS to the server at {dest} failed: {e}"),
                    "08006",
                ))
                .await;
            let _ = w.flush().await;
            return None;
        }
    };
    // Channel binding matches only if the server's certificate is the one the client saw
    // (the proxy's).
    let same = server
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        == Some(&tls.leaf);
    if let Ok(mut c) = conn.lock() {
        c.relay.strip_channel_binding = !same;
    }
    let (cr, cw) = halves(client);
    let (sr, sw) = halves(server);
    Some((cr, cw, sr, sw))
}
