package tenkisandbox

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestDescriptorsLoad(t *testing.T) {
	for _, m := range []struct{ svc, name string }{
		{ControlService, "CreateSession"}, {ControlService, "WaitSession"}, {ControlService, "GetSession"},
		{ControlService, "TerminateSession"}, {ControlService, "CreateSessionCredential"},
		{ControlService, "ListSessions"}, {ControlService, "CreateSnapshot"}, {ControlService, "GetSnapshot"},
		{ControlService, "ListSnapshots"}, {ControlService, "ListSessionSnapshots"}, {ControlService, "DeleteSnapshot"},
		{DataPlaneService, "Run"}, {DataPlaneService, "ReadFile"}, {DataPlaneService, "WriteFile"}, {DataPlaneService, "Stat"},
	} {
		md, err := MethodDescriptor(m.svc, m.name)
		if err != nil {
			t.Fatalf("%s/%s: %v", m.svc, m.name, err)
		}
		if m.svc == DataPlaneService {
			want := "tenki.sandbox.v1.SandboxSessionDataPlaneService" + m.name + "Request"
			if string(md.Input().FullName()) != want {
				t.Errorf("%s input %s, want %s", m.name, md.Input().FullName(), want)
			}
		}
	}
	if !MustStream(t, "WaitSession").IsStreamingServer() || !MustStream(t, "Run").IsStreamingClient() {
		t.Fatal("stream kinds")
	}
}

func MustStream(t *testing.T, name string) interface {
	IsStreamingServer() bool
	IsStreamingClient() bool
} {
	svc := ControlService
	if name == "Run" {
		svc = DataPlaneService
	}
	md, err := MethodDescriptor(svc, name)
	if err != nil {
		t.Fatal(err)
	}
	return md
}

func TestNewClientConfig(t *testing.T) {
	t.Setenv("TENKI_API_ENDPOINT", "")
	t.Setenv("TENKI_API_URL", "")
	t.Setenv("TENKI_API_KEY", "")
	t.Setenv("TENKI_AUTH_TOKEN", "")
	if _, err := NewClientFromEnv(); !errors.Is(err, ErrMissingAuthToken) {
		t.Fatalf("no key: %v", err)
	}
	t.Setenv("TENKI_API_KEY", "sk_nope")
	if _, err := NewClientFromEnv(); !errors.Is(err, ErrInvalidAuthToken) || !errors.Is(err, ErrSandbox) {
		t.Fatalf("bad key: %v", err)
	}
	t.Setenv("TENKI_API_KEY", "tk_abc")
	c, err := NewClientFromEnv()
	if err != nil || c.Endpoint() != DefaultEndpoint {
		t.Fatalf("default endpoint: %v %v", c, err)
	}
	t.Setenv("TENKI_API_URL", "http://127.0.0.1:1")
	if c, _ := NewClientFromEnv(); c.Endpoint() != "http://127.0.0.1:1" {
		t.Fatalf("TENKI_API_URL: %s", c.Endpoint())
	}
	t.Setenv("TENKI_API_ENDPOINT", "http://127.0.0.1:2")
	t.Setenv("TENKI_AUTH_TOKEN", "tk_wins")
	c, _ = NewClientFromEnv()
	if c.Endpoint() != "http://127.0.0.1:2" || c.authToken != "tk_wins" {
		t.Fatalf("env precedence: %s %s", c.Endpoint(), c.authToken)
	}
	c, _ = NewClient(WithEndpoint("https://x.example"), WithAPIKey("tk_opt"))
	if c.Endpoint() != "https://x.example" || c.authToken != "tk_opt" {
		t.Fatal("options win over the environment")
	}
	if _, err := NewClient(WithEndpoint("ftp://x")); !errors.Is(err, ErrInvalidEndpoint) {
		t.Fatalf("ftp: %v", err)
	}
	for in, want := range map[string]struct {
		target string
		tls    bool
	}{
		"http://127.0.0.1:8080":   {"127.0.0.1:8080", false},
		"http://localhost":        {"localhost:80", false},
		"https://api.tenki.cloud": {"api.tenki.cloud:443", true},
		"https://h:8443/":         {"h:8443", true},
		"127.0.0.1:8080":          {"127.0.0.1:8080", true},
	} {
		target, tls, err := parseEndpoint(in)
		if err != nil || target != want.target || tls != want.tls {
			t.Errorf("parseEndpoint(%q) = %q %v %v, want %+v", in, target, tls, err, want)
		}
	}
}

func TestKindOf(t *testing.T) {
	for _, tc := range []struct {
		code codes.Code
		msg  string
		want error
	}{
		{codes.Unauthenticated, "unknown API key", ErrUnauthorized},
		{codes.PermissionDenied, "no", ErrPermissionDenied},
		{codes.NotFound, "snapshot snp_1 not found", ErrSnapshotNotFound},
		{codes.NotFound, "session ses_1 not found", ErrSessionNotFound},
		{codes.NotFound, "volume vol_1 not found", ErrVolumeNotFound},
		{codes.NotFound, "template tpl_1 not found", ErrTemplateNotFound},
		{codes.NotFound, "template build b_1 not found", ErrTemplateBuildNotFound},
		{codes.NotFound, "template snapshot gone", ErrTemplateNotFound}, // "template" is tested before "snapshot"
		{codes.NotFound, "registry image x not found", ErrRegistryImageNotFound},
		{codes.NotFound, "/x: No such file or directory", ErrFileNotFound},
		{codes.NotFound, "artifact expired", ErrSessionExpired},
		{codes.NotFound, "whatever", ErrSessionNotFound},
		{codes.AlreadyExists, "template exists", ErrTemplateExists},
		{codes.AlreadyExists, "name taken", ErrAlreadyExists},
		{codes.DeadlineExceeded, "late", ErrCommandTimeout},
		{codes.ResourceExhausted, "maximum exposed ports reached", ErrPortLimitExceeded},
		{codes.ResourceExhausted, "Rate limit hit", ErrRateLimited},
		{codes.ResourceExhausted, "no capacity: host full", ErrCapacityUnavailable},
		{codes.ResourceExhausted, "volume limit", ErrVolumeLimitExceeded},
		{codes.ResourceExhausted, "max_sessions 5 reached", ErrQuotaExceeded},
		{codes.FailedPrecondition, "session ses_1 is TERMINATED; only a running session can be snapshotted", ErrSessionTerminated},
		{codes.FailedPrecondition, "snapshot not yet durable", ErrSnapshotNotDurable},
		{codes.FailedPrecondition, "git clone failed (exit_code=128)", ErrGitOperationFailed},
		{codes.FailedPrecondition, "volume sync pending", ErrVolumeSyncPending},
		{codes.FailedPrecondition, "the volume is attached to ses_1", ErrVolumeInUse},
		{codes.FailedPrecondition, "inbound access is disabled", ErrInboundDisabled},
		{codes.FailedPrecondition, "template build already in progress", ErrTemplateBuildInProgress},
		{codes.FailedPrecondition, "session is PAUSED", ErrInvalidState},
		{codes.Unavailable, "connection refused", ErrUnavailable},
		{codes.InvalidArgument, "cpu_cores: too many", ErrInvalidArgument},
		{codes.Unimplemented, "SandboxService.X is not implemented", ErrUnimplemented},
		{codes.Unimplemented, "404 route", ErrDataPlaneNotReady},
		{codes.Internal, "boom", ErrInternal},
		{codes.Unknown, "?", ErrSandbox},
	} {
		err := mapError("Op", nil, status.Error(tc.code, tc.msg))
		if !errors.Is(err, tc.want) || !errors.Is(err, ErrSandbox) {
			t.Errorf("%s %q → %v, want %v", tc.code, tc.msg, err, tc.want)
		}
		if !strings.Contains(err.Error(), tc.msg) {
			t.Errorf("%v does not carry the server's message", err)
		}
		if status.Code(err) != tc.code {
			t.Errorf("status.Code(%v) = %s, want %s", err, status.Code(err), tc.code)
		}
	}
	err := mapError("Op", nil, status.Error(codes.FailedPrecondition, "git clone failed (exit_code=128)"))
	var e *Error
	if !errors.As(err, &e) || e.ExitCode != 128 {
		t.Fatalf("exit code: %+v", e)
	}
	if e := mapError("Op", nil, status.Error(codes.Unavailable, "x")).(*Error); !e.Retryable {
		t.Fatal("UNAVAILABLE is retryable")
	}
}

func TestErrorsOverTheWire(t *testing.T) {
	f := newFake(t)
	c := f.client(t)
	ctx := ctxT(t)
	_, err := c.GetSnapshot(ctx, "snp_nope")
	if !errors.Is(err, ErrSnapshotNotFound) || errors.Is(err, ErrSessionNotFound) {
		t.Fatalf("GetSnapshot: %v", err)
	}
	if !strings.Contains(err.Error(), "snapshot snp_nope not found") {
		t.Fatalf("message: %v", err)
	}
	if _, err := c.GetSession(ctx, "ses_nope"); !errors.Is(err, ErrSessionNotFound) {
		t.Fatalf("GetSession: %v", err)
	}
	bad, _ := NewClient(WithEndpoint(f.endpoint), WithAPIKey("tk_wrong"))
	defer bad.Close()
	if _, err := bad.ListSnapshots(ctx); !errors.Is(err, ErrUnauthorized) {
		t.Fatalf("bad key: %v", err)
	}
	// the control plane carries the key, as a Bearer token
	if got := f.callsOf("GetSnapshot")[0].md.Get("authorization"); len(got) != 1 || got[0] != "Bearer "+fakeKey {
		t.Fatalf("authorization %v", got)
	}
	dead, _ := NewClient(WithEndpoint("http://127.0.0.1:1"), WithAPIKey(fakeKey))
	defer dead.Close()
	if _, err := dead.GetSession(ctx, "x"); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("nothing listening: %v", err)
	}
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := c.GetSession(cctx, "x"); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled: %v", err)
	}
}

func TestCreateWaitsThroughWaitSession(t *testing.T) {
	f := newFake(t)
	f.sessionStates = []string{"CREATING", "CREATING", "RUNNING"}
	c := f.client(t)
	ctx := ctxT(t)
	s, err := c.Create(ctx, WithName("demo"), WithTags("Seed", "b"), WithCPU(2), WithMemoryMB(4096))
	if err != nil {
		t.Fatal(err)
	}
	if s.State != SessionStateRunning || s.Name != "demo" || s.CreatedAt.IsZero() || s.DataPlaneEndpoint != f.endpoint {
		t.Fatalf("session %+v", s)
	}
	req := f.callsOf("CreateSession")[0].req
	if req.str("owner_id") != "self" || req.str("owner_type") != "SERVICE" || !req.boolean("allow_inbound") ||
		req.int("cpu_cores") != 2 || req.int("memory_mb") != 4096 || req.boolean("wait_ready") ||
		fmt.Sprint(req.strs("tags")) != "[seed b]" || req.has("snapshot_id") || req.has("disk_size_gb") {
		t.Fatalf("request %v", req.m)
	}
	if n := len(f.callsOf("WaitSession")); n != 1 {
		t.Fatalf("%d WaitSession calls", n)
	}
	if n := len(f.callsOf("GetSession")); n != 0 {
		t.Fatalf("polled %d times though WaitSession works", n)
	}
	// restore: snapshot_id, and the source is read back
	snap, err := c.CreateSnapshotAndWait(ctx, s.ID, "base", nil, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	r, err := c.Create(ctx, WithSnapshot(snap.ID), WithName("restored-copy"))
	if err != nil || r.SourceSnapshotID != snap.ID || r.ID == s.ID || r.Name != "restored-copy" {
		t.Fatalf("restore: %+v %v", r, err)
	}
	if got := f.callsOf("CreateSession")[1].req.str("snapshot_id"); got != snap.ID {
		t.Fatalf("snapshot_id %q", got)
	}
	if _, err := c.Create(ctx, WithSnapshot("snp_gone")); !errors.Is(err, ErrSnapshotNotFound) {
		t.Fatalf("restore of a missing snapshot: %v", err)
	}
}

func TestCreatePollsWhenWaitSessionIsUnimplemented(t *testing.T) {
	f := newFake(t)
	f.waitUnimplemented = true
	f.credInResponse = false
	f.sessionStates = []string{"CREATING", "CREATING", "CREATING", "RUNNING"}
	c := f.client(t)
	t0 := time.Now()
	s, err := c.Create(ctxT(t))
	if err != nil || s.State != SessionStateRunning {
		t.Fatalf("%+v %v", s, err)
	}
	if n := len(f.callsOf("GetSession")); n != 3 {
		t.Fatalf("%d GetSession polls, want 3", n)
	}
	if d := time.Since(t0); d < 2*pollInterval {
		t.Fatalf("polled too fast: %s", d)
	}
	// no route came with the answers: the data plane is found through CreateSessionCredential
	if _, err := c.WriteFile(ctxT(t), s.ID, "a.txt", []byte("x")); err != nil {
		t.Fatal(err)
	}
	if n := len(f.callsOf("CreateSessionCredential")); n != 1 {
		t.Fatalf("%d CreateSessionCredential calls", n)
	}
}

func TestCreateTerminalAndTimeout(t *testing.T) {
	f := newFake(t)
	f.sessionStates = []string{"CREATING", "TERMINATED"}
	c := f.client(t)
	s, err := c.Create(ctxT(t))
	if !errors.Is(err, ErrSessionTerminated) || s == nil || s.ID == "" {
		t.Fatalf("terminal: %+v %v", s, err)
	}
	f.sessionStates = []string{"CREATING"}
	f.waitUnimplemented = true
	s, err = c.Create(ctxT(t), WithWaitTimeout(700*time.Millisecond))
	if !errors.Is(err, ErrSessionWaitTimeout) || s == nil || s.ID == "" {
		t.Fatalf("timeout: %+v %v", s, err)
	}
	var e *Error
	if !errors.As(err, &e) || e.Session == nil || e.Session.ID != s.ID {
		t.Fatalf("the error carries the session: %+v", e)
	}
	s, err = c.Create(ctxT(t), WithoutWait())
	if err != nil || s.State != SessionStateCreating {
		t.Fatalf("no wait: %+v %v", s, err)
	}
}

func TestSnapshots(t *testing.T) {
	f := newFake(t)
	c := f.client(t)
	ctx := ctxT(t)
	s, err := c.Create(ctx)
	if err != nil {
		t.Fatal(err)
	}
	f.snapshotStates = []string{"CREATING", "CREATING", "READY"}
	snap, err := c.CreateSnapshot(ctx, s.ID, "baseline", nil)
	if err != nil || snap.State != SnapshotStateCreating || snap.Name != "baseline" || snap.SessionID != s.ID {
		t.Fatalf("CreateSnapshot: %+v %v", snap, err)
	}
	req := f.callsOf("CreateSnapshot")[0].req
	if !req.boolean("async") || req.str("name") != "baseline" || req.has("expires_at") {
		t.Fatalf("request %v", req.m)
	}
	snap, err = c.WaitSnapshotReady(ctx, snap.ID, 5*time.Minute)
	if err != nil || snap.State != SnapshotStateReady || snap.SizeBytes != 1000 || snap.MemoryBytes != 4096 ||
		snap.BaseImageID != "sandbox" || snap.WorkspaceID != "ws_1" || snap.CreatedAt.Unix() != 1700000000 || snap.ExpiresAt != nil {
		t.Fatalf("WaitSnapshotReady: %+v %v", snap, err)
	}
	exp := time.Now().Add(time.Hour).Truncate(time.Second)
	raw := true
	if _, err := c.CreateSnapshot(ctx, s.ID, "", &SnapshotOptions{ExpiresAt: exp, StoreRawImage: &raw}); err != nil {
		t.Fatal(err)
	}
	req = f.callsOf("CreateSnapshot")[1].req
	if req.has("name") || req.timestamp("expires_at").Unix() != exp.Unix() || !req.boolean("store_raw_image") {
		t.Fatalf("options: %v", req.m)
	}

	// FAILED while waiting: ErrSnapshotFailed with the reason
	f.snapshotStates = []string{"CREATING", "FAILED"}
	f.failureReason = "capture: guest did not answer"
	_, err = c.CreateSnapshotAndWait(ctx, s.ID, "bad", nil, DefaultSnapshotCreateTimeout)
	if !errors.Is(err, ErrSnapshotFailed) || !errors.Is(err, ErrSandbox) {
		t.Fatalf("FAILED: %v", err)
	}
	var e *Error
	if !errors.As(err, &e) || e.FailureReason != f.failureReason || e.Snapshot == nil || e.Snapshot.State != SnapshotStateFailed {
		t.Fatalf("failure reason: %+v", e)
	}
	if !strings.Contains(err.Error(), f.failureReason) {
		t.Fatalf("message %v", err)
	}
	// FAILED right away (the create answer itself)
	f.snapshotStates = []string{"FAILED"}
	if _, err := c.CreateSnapshotAndWait(ctx, s.ID, "bad2", nil, time.Minute); !errors.Is(err, ErrSnapshotFailed) {
		t.Fatalf("FAILED at once: %v", err)
	}
	// wrapped again by a caller, still matches
	wrapped := fmt.Errorf("setting up: %w", err)
	if !errors.Is(wrapped, ErrSnapshotFailed) {
		t.Fatal("wrapped")
	}

	// a wait that runs out
	f.snapshotStates = []string{"CREATING"}
	slow, _ := c.CreateSnapshot(ctx, s.ID, "slow", nil)
	t0 := time.Now()
	if _, err := c.WaitSnapshotReady(ctx, slow.ID, 600*time.Millisecond); !errors.Is(err, ErrSnapshotWaitTimeout) {
		t.Fatalf("timeout: %v", err)
	} else if d := time.Since(t0); d > 3*time.Second {
		t.Fatalf("timeout took %s", d)
	}

	// delete: the record as answered, then DELETED: a wait on it is an invalid state
	del, err := c.DeleteSnapshot(ctx, snap.ID)
	if err != nil || del.ID != snap.ID || del.State != SnapshotStateDeleting {
		t.Fatalf("DeleteSnapshot: %+v %v", del, err)
	}
	if _, err := c.WaitSnapshotReady(ctx, snap.ID, time.Minute); !errors.Is(err, ErrInvalidState) {
		t.Fatalf("wait on a deleted snapshot: %v", err)
	}

	// a terminated session cannot be snapshotted
	if _, err := c.Terminate(ctx, s.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := c.CreateSnapshot(ctx, s.ID, "late", nil); !errors.Is(err, ErrSessionTerminated) {
		t.Fatalf("terminated: %v", err)
	}
}

func TestListSnapshotsFollowsPages(t *testing.T) {
	f := newFake(t)
	c := f.client(t)
	ctx := ctxT(t)
	s, _ := c.Create(ctx)
	got, err := c.ListSnapshots(ctx)
	if err != nil || got == nil || len(got) != 0 {
		t.Fatalf("empty: %v %v", got, err)
	}
	var want []string
	for i := 0; i < 5; i++ {
		snap, err := c.CreateSnapshot(ctx, s.ID, fmt.Sprint("n", i), nil)
		if err != nil {
			t.Fatal(err)
		}
		want = append(want, snap.ID)
	}
	before := len(f.callsOf("ListSnapshots"))
	got, err = c.ListSnapshots(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, s := range got {
		ids = append(ids, s.ID)
	}
	if fmt.Sprint(ids) != fmt.Sprint(want) {
		t.Fatalf("got %v, want %v", ids, want)
	}
	calls := f.callsOf("ListSnapshots")[before:]
	if len(calls) != 3 {
		t.Fatalf("%d pages, want 3", len(calls))
	}
	if calls[0].req.int("page_size") != 100 || calls[0].req.str("page_token") != "" ||
		calls[1].req.str("page_token") != "2" || calls[2].req.str("page_token") != "4" {
		t.Fatalf("tokens: %v %v %v", calls[0].req.m, calls[1].req.m, calls[2].req.m)
	}
	f.stallToken = true
	if _, err := c.ListSnapshots(ctx); !errors.Is(err, ErrPaginationStalled) {
		t.Fatalf("stalled: %v", err)
	}
}

func TestExecAndFiles(t *testing.T) {
	f := newFake(t)
	c := f.client(t)
	ctx := ctxT(t)
	s, err := c.Create(ctx)
	if err != nil {
		t.Fatal(err)
	}
	n, err := c.WriteFile(ctx, s.ID, "note.txt", []byte("hello"))
	if err != nil || n != 5 {
		t.Fatalf("WriteFile: %d %v", n, err)
	}
	b, err := c.ReadFile(ctx, s.ID, "/home/tenki/note.txt")
	if err != nil || string(b) != "hello" {
		t.Fatalf("ReadFile: %q %v", b, err)
	}
	if _, err := c.ReadFile(ctx, s.ID, "nope"); !errors.Is(err, ErrFileNotFound) {
		t.Fatalf("missing file: %v", err)
	}
	if fi, err := c.Stat(ctx, s.ID, "note.txt"); err != nil || fi.Size != 5 {
		t.Fatalf("Stat: %+v %v", fi, err)
	}
	if _, err := c.Stat(ctx, s.ID, "nope"); !errors.Is(err, ErrFileNotFound) {
		t.Fatalf("Stat missing: %v", err)
	}
	// the credential came with the Create answer: no CreateSessionCredential, and the data
	// plane got the session credential and no API key (the fake refuses one)
	if n := len(f.callsOf("CreateSessionCredential")); n != 0 {
		t.Fatalf("%d CreateSessionCredential calls", n)
	}
	if cert := f.callsOf("WriteFile")[0].md.Get(sessionCertHeader); len(cert) != 1 || !strings.HasPrefix(cert[0], "cred-"+s.ID) {
		t.Fatalf("cert %v", cert)
	}

	res, err := c.Exec(ctx, s.ID, []string{"echo", "hi"}, nil)
	if err != nil || !res.OK() || string(res.Stdout) != "echo hi\n" || string(res.Stderr) != "warn\n" || res.PID != 42 {
		t.Fatalf("Exec: %+v %v", res, err)
	}
	start := f.callsOf("Run")[0].req
	if start.str("session_id") != s.ID || !start.boolean("stream_stdin") || fmt.Sprint(start.strs("cmd")) != "[echo hi]" {
		t.Fatalf("start %v", start.m)
	}
	res, err = c.Exec(ctx, s.ID, []string{"exit", "7"}, &ExecOptions{Timeout: 2 * time.Second, Cwd: "/tmp", Env: map[string]string{"A": "1"}})
	if err != nil || res.ExitCode != 7 || res.OK() {
		t.Fatalf("exit 7: %+v %v", res, err)
	}
	start = f.callsOf("Run")[1].req
	if start.int("timeout_ms") != 2000 || start.str("cwd") != "/tmp" || start.strMap("env")["A"] != "1" {
		t.Fatalf("start options %v", start.m)
	}
	// stdin larger than the fake's 8-byte window: sent in granted pieces
	in := strings.Repeat("0123456789", 5)
	res, err = c.Exec(ctx, s.ID, []string{"cat"}, &ExecOptions{Stdin: []byte(in)})
	if err != nil || string(res.Stdout) != in {
		t.Fatalf("stdin: %+v %v", res, err)
	}
	if _, err := c.Exec(ctx, s.ID, nil, nil); !errors.Is(err, ErrInvalidArgument) {
		t.Fatalf("empty command: %v", err)
	}
	// an expired credential: one renewal through CreateSessionCredential, then the call goes through
	f.dataUnauthOnce = true
	if _, err := c.ReadFile(ctx, s.ID, "note.txt"); err != nil {
		t.Fatalf("after renewal: %v", err)
	}
	if n := len(f.callsOf("CreateSessionCredential")); n != 1 {
		t.Fatalf("%d renewals", n)
	}
	if _, err := c.Exec(ctx, "ses_nope", []string{"true"}, nil); !errors.Is(err, ErrSessionNotFound) {
		t.Fatalf("unknown session: %v", err)
	}
	if _, err := c.Terminate(ctx, s.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Exec(ctx, s.ID, []string{"true"}, nil); !errors.Is(err, ErrSessionTerminated) {
		t.Fatalf("exec in a terminated session: %v", err)
	}
}
