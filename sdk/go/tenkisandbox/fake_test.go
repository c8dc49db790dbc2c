package tenkisandbox

// An in-process fake of Tenki's wire, built on the same descriptors (an unknown-service
// handler decoding dynamic messages). It models just enough state for the client's logic:
// error mapping, paging, waits, credentials, exec and files.

import (
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/reflect/protoreflect"
)

const fakeKey = "tk_test_key"

type call struct {
	method string
	req    msg
	md     metadata.MD
}

type fakeSnapshot struct {
	id, sessionID, name string
	states              []string // the states GetSnapshot reports, one per read; the last one stays
	reads               int
	failureReason       string
}

type fakeSession struct {
	id, name, snapshotID string
	states               []string // WaitSession/GetSession progression; the last one stays
	reads                int
	files                map[string][]byte
}

type fake struct {
	t        *testing.T
	endpoint string
	srv      *grpc.Server

	mu        sync.Mutex
	calls     []call
	sessions  map[string]*fakeSession
	snapshots map[string]*fakeSnapshot
	order     []string // snapshot ids, oldest first
	seq       int

	// knobs
	pageSize          int              // ListSnapshots page size (default 2)
	stallToken        bool             // ListSnapshots returns the same token forever
	waitUnimplemented bool             // WaitSession answers UNIMPLEMENTED
	sessionStates     []string         // states a new session goes through (default CREATING, RUNNING)
	snapshotStates    []string         // states a new snapshot goes through (default CREATING, READY)
	failureReason     string           // failure_reason on FAILED snapshots
	credInResponse    bool             // Create/Wait answers carry the credential (default true)
	errs              map[string]error // method → error to answer (once per entry)
	dataUnauthOnce    bool             // the first data-plane call is UNAUTHENTICATED
	credSerial        int
}

func newFake(t *testing.T) *fake {
	t.Helper()
	f := &fake{t: t, sessions: map[string]*fakeSession{}, snapshots: map[string]*fakeSnapshot{},
		pageSize: 2, credInResponse: true, errs: map[string]error{}}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f.endpoint = "http://" + lis.Addr().String()
	f.srv = grpc.NewServer(grpc.UnknownServiceHandler(f.handle))
	go f.srv.Serve(lis)
	t.Cleanup(f.srv.Stop)
	return f
}

func (f *fake) client(t *testing.T) *Client {
	t.Helper()
	c, err := NewClient(WithEndpoint(f.endpoint), WithAPIKey(fakeKey))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func (f *fake) record(method string, req msg, md metadata.MD) {
	f.mu.Lock()
	f.calls = append(f.calls, call{method, req, md})
	f.mu.Unlock()
}

func (f *fake) callsOf(method string) []call {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []call
	for _, c := range f.calls {
		if c.method == method {
			out = append(out, c)
		}
	}
	return out
}

func (f *fake) id(prefix string) string {
	f.seq++
	return fmt.Sprintf("%s_%04d", prefix, f.seq)
}

func (f *fake) handle(_ any, stream grpc.ServerStream) error {
	full, _ := grpc.MethodFromServerStream(stream)
	parts := strings.Split(strings.TrimPrefix(full, "/"), "/")
	if len(parts) != 2 {
		return status.Error(codes.Unimplemented, "bad path")
	}
	svc, name := parts[0], parts[1]
	md, err := MethodDescriptor(svc, name)
	if err != nil {
		return status.Errorf(codes.Unimplemented, "%s is not implemented", full)
	}
	in, _ := metadata.FromIncomingContext(stream.Context())
	if svc == ControlService {
		if got := in.Get("authorization"); len(got) != 1 || got[0] != "Bearer "+fakeKey {
			return status.Errorf(codes.Unauthenticated, "unknown API key")
		}
	} else {
		if len(in.Get("authorization")) != 0 {
			return status.Error(codes.InvalidArgument, "the data plane takes no API key")
		}
		f.mu.Lock()
		unauth := f.dataUnauthOnce
		f.dataUnauthOnce = false
		f.mu.Unlock()
		if unauth {
			return status.Error(codes.Unauthenticated, "session credential expired")
		}
		if c := in.Get(sessionCertHeader); len(c) != 1 || !strings.HasPrefix(c[0], "cred-") {
			return status.Error(codes.Unauthenticated, "missing session credential")
		}
	}
	if name == "Run" {
		return f.run(stream, in)
	}
	req := NewMessage(string(md.Input().FullName()))
	if err := stream.RecvMsg(req); err != nil {
		return err
	}
	f.record(name, wrap(req), in)
	f.mu.Lock()
	if e, ok := f.errs[name]; ok {
		delete(f.errs, name)
		f.mu.Unlock()
		return e
	}
	f.mu.Unlock()
	if name == "WaitSession" {
		return f.waitSession(wrap(req), stream)
	}
	out := wrap(NewMessage(string(md.Output().FullName())))
	if err := f.unary(name, wrap(req), out); err != nil {
		return err
	}
	return stream.SendMsg(out.proto())
}

func (f *fake) sessionMsg(s *fakeSession, state string, into msg) {
	into.set("id", s.id).set("name", s.name).set("state", enumNumber(into, "state", "SESSION_STATE_"+state))
	if s.snapshotID != "" {
		into.set("source_snapshot_id", s.snapshotID)
	}
	into.set("created_at", time.Unix(1700000000, 0))
}

func (f *fake) snapshotMsg(s *fakeSnapshot, state string, into msg) {
	into.set("id", s.id).set("session_id", s.sessionID).set("state", enumNumber(into, "state", "SNAPSHOT_STATE_"+state)).
		set("size_bytes", int64(1000)).set("memory_bytes", int64(4096)).set("base_image_id", "sandbox").
		set("created_at", time.Unix(1700000000, 0)).set("workspace_id", "ws_1")
	if s.name != "" {
		into.set("name", s.name)
	}
	if state == "FAILED" {
		into.set("failure_reason", s.failureReason)
	}
}

func enumNumber(m msg, field, name string) int {
	v := m.fd(field).Enum().Values().ByName(protoreflect.Name(name))
	if v == nil {
		panic("no enum value " + name)
	}
	return int(v.Number())
}

func next(states []string, reads *int) string {
	i := *reads
	if i >= len(states) {
		i = len(states) - 1
	}
	*reads++
	return states[i]
}

func (f *fake) route(s *fakeSession, out msg) {
	if !f.credInResponse {
		return
	}
	f.credSerial++
	out.set("data_plane_endpoint", f.endpoint)
	out.mutable("credential").set("credential", fmt.Sprintf("cred-%s-%d", s.id, f.credSerial)).
		set("expires_at", time.Now().Add(15*time.Minute))
}

func (f *fake) waitSession(req msg, stream grpc.ServerStream) error {
	f.mu.Lock()
	unimpl := f.waitUnimplemented
	s := f.sessions[req.str("session_id")]
	f.mu.Unlock()
	if unimpl {
		return status.Error(codes.Unimplemented, "SandboxService.WaitSession is not implemented")
	}
	if s == nil {
		return status.Errorf(codes.NotFound, "session %s not found", req.str("session_id"))
	}
	for {
		f.mu.Lock()
		state := next(s.states, &s.reads)
		out := wrap(NewMessage("WaitSessionResponse"))
		f.sessionMsg(s, state, out.mutable("session"))
		if state == "RUNNING" {
			f.route(s, out)
		}
		f.mu.Unlock()
		if err := stream.SendMsg(out.proto()); err != nil {
			return err
		}
		if state != "CREATING" && state != "RESUMING" {
			return nil
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (f *fake) unary(name string, req, out msg) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	switch name {
	case "CreateSession":
		states := f.sessionStates
		if states == nil {
			states = []string{"CREATING", "RUNNING"}
		}
		if sid := req.str("snapshot_id"); sid != "" {
			if _, ok := f.snapshots[sid]; !ok {
				return status.Errorf(codes.NotFound, "snapshot %s not found", sid)
			}
		}
		s := &fakeSession{id: f.id("ses"), name: req.str("name"), snapshotID: req.str("snapshot_id"),
			states: states, files: map[string][]byte{}}
		f.sessions[s.id] = s
		state := next(s.states, &s.reads)
		f.sessionMsg(s, state, out.mutable("session"))
		if state == "RUNNING" {
			f.route(s, out)
		}
	case "GetSession", "TerminateSession", "CreateSessionCredential":
		s := f.sessions[req.str("session_id")]
		if s == nil {
			return status.Errorf(codes.NotFound, "session %s not found", req.str("session_id"))
		}
		switch name {
		case "GetSession":
			f.sessionMsg(s, next(s.states, &s.reads), out.mutable("session"))
		case "TerminateSession":
			s.states, s.reads = []string{"TERMINATED"}, 0
			f.sessionMsg(s, "TERMINATED", out.mutable("session"))
		default:
			if s.states[len(s.states)-1] == "TERMINATED" {
				return status.Errorf(codes.FailedPrecondition, "session %s is TERMINATED", s.id)
			}
			f.credSerial++
			out.set("data_plane_endpoint", f.endpoint)
			out.mutable("credential").set("credential", fmt.Sprintf("cred-%s-%d", s.id, f.credSerial)).
				set("expires_at", time.Now().Add(15*time.Minute))
		}
	case "CreateSnapshot":
		s := f.sessions[req.str("session_id")]
		if s == nil {
			return status.Errorf(codes.NotFound, "session %s not found", req.str("session_id"))
		}
		if s.states[len(s.states)-1] == "TERMINATED" {
			return status.Errorf(codes.FailedPrecondition, "session %s is TERMINATED; only a running session can be snapshotted", s.id)
		}
		states := f.snapshotStates
		if states == nil {
			states = []string{"CREATING", "READY"}
		}
		snap := &fakeSnapshot{id: f.id("snp"), sessionID: s.id, name: req.str("name"), states: states,
			failureReason: f.failureReason}
		f.snapshots[snap.id] = snap
		f.order = append(f.order, snap.id)
		f.snapshotMsg(snap, next(snap.states, &snap.reads), out.mutable("snapshot"))
	case "GetSnapshot", "DeleteSnapshot":
		snap := f.snapshots[req.str("snapshot_id")]
		if snap == nil {
			return status.Errorf(codes.NotFound, "snapshot %s not found", req.str("snapshot_id"))
		}
		if name == "DeleteSnapshot" {
			snap.states, snap.reads = []string{"DELETED"}, 0
			f.snapshotMsg(snap, "DELETING", out.mutable("snapshot"))
			return nil
		}
		f.snapshotMsg(snap, next(snap.states, &snap.reads), out.mutable("snapshot"))
	case "ListSnapshots":
		start := 0
		if tok := req.str("page_token"); tok != "" {
			fmt.Sscan(tok, &start)
		}
		end := min(start+f.pageSize, len(f.order))
		for _, id := range f.order[start:end] {
			snap := f.snapshots[id]
			st := snap.states[len(snap.states)-1]
			f.snapshotMsg(snap, st, out.appendMsg("snapshots"))
		}
		switch {
		case f.stallToken:
			out.set("next_page_token", "same")
		case end < len(f.order):
			out.set("next_page_token", fmt.Sprint(end))
		}
	case "WriteFile", "ReadFile", "Stat":
		in := req.sub("request")
		s := f.sessions[in.str("session_id")]
		if s == nil {
			return status.Errorf(codes.NotFound, "session %s not found", in.str("session_id"))
		}
		path := in.str("path")
		if !strings.HasPrefix(path, "/") {
			path = "/home/tenki/" + path
		}
		o := out.mutable("response")
		switch name {
		case "WriteFile":
			s.files[path] = append([]byte(nil), in.bytes("content")...)
			o.set("path", path).set("size_bytes", int64(len(in.bytes("content"))))
		case "ReadFile":
			b, ok := s.files[path]
			if !ok {
				return status.Errorf(codes.NotFound, "%s: no such file or directory", path)
			}
			o.set("path", path).set("content", b)
		case "Stat":
			b, ok := s.files[path]
			o.set("exists", ok)
			if ok {
				o.set("size", int64(len(b)))
			}
		}
	default:
		return status.Errorf(codes.Unimplemented, "SandboxService.%s is not implemented by the fake", name)
	}
	return nil
}

// run: "cat" echoes stdin; "exit N" exits N; anything else prints its argv on stdout and
// "warn" on stderr. The started frame comes first, with a small stdin window.
func (f *fake) run(stream grpc.ServerStream, in metadata.MD) error {
	first := NewMessage("SandboxSessionDataPlaneServiceRunRequest")
	if err := stream.RecvMsg(first); err != nil {
		return err
	}
	start := wrap(first).sub("frame").sub("start")
	f.record("Run", start, in)
	if !start.valid() {
		return status.Error(codes.InvalidArgument, "the first frame must be start")
	}
	if !start.boolean("stream_stdin") {
		return status.Error(codes.InvalidArgument, "want stream_stdin")
	}
	send := func(build func(f msg)) error {
		out := newMsg("SandboxSessionDataPlaneServiceRunResponse")
		build(out.mutable("frame"))
		return stream.SendMsg(out.proto())
	}
	const window = 8
	if err := send(func(fr msg) {
		fr.mutable("started").set("pid", uint64ToInt(42)).set("stdin_window_bytes", uint32(window))
	}); err != nil {
		return err
	}
	var stdin []byte
	for {
		m := NewMessage("SandboxSessionDataPlaneServiceRunRequest")
		if err := stream.RecvMsg(m); err != nil {
			if err == io.EOF {
				break
			}
			return err
		}
		fr := wrap(m).sub("frame")
		switch fr.oneofCase("payload") {
		case "stdin":
			b := fr.bytes("stdin")
			if len(b) > window {
				return status.Errorf(codes.InvalidArgument, "stdin frame of %d bytes over the window", len(b))
			}
			stdin = append(stdin, b...)
			if err := send(func(fr msg) { fr.mutable("flow").set("stdin_grant_bytes", uint32(len(b))) }); err != nil {
				return err
			}
		case "stdin_close":
			goto done
		}
	}
done:
	cmd := start.strs("cmd")
	code := 0
	switch {
	case cmd[0] == "cat":
		if err := send(func(fr msg) { fr.set("stdout", stdin) }); err != nil {
			return err
		}
	case cmd[0] == "exit":
		fmt.Sscan(cmd[1], &code)
	default:
		send(func(fr msg) { fr.set("stdout", []byte(strings.Join(cmd, " ")+"\n")) })
		send(func(fr msg) { fr.set("stderr", []byte("warn\n")) })
	}
	return send(func(fr msg) { fr.mutable("exit").set("exit_code", int32(code)).set("duration_ms", 5) })
}

func uint64ToInt(v uint64) int { return int(v) }
