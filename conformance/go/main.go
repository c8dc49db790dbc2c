// Conformance: the Go SDK in sdk/go (package tenkisandbox) against a live Tenki endpoint.
//
//	TENKI_API_ENDPOINT=http://127.0.0.1:PORT TENKI_API_KEY=tk_... go run .
//
// Only the environment configures the client. It runs the snapshot spec's Go calls as written
// (CreateSnapshot, CreateSnapshotAndWait, GetSnapshot, ListSnapshots, WaitSnapshotReady,
// Create WithSnapshot+WithName, DeleteSnapshot), checks that a file written before the snapshot
// is there in the restored session, and checks the sentinel errors. One line per step; on the
// first failure it says which step and why, cleans up and exits 1. Everything it creates is
// terminated or deleted before it exits, failure or not.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	tenkisandbox "github.com/tenki-self-hosted/tenkibox/sdk/go/tenkisandbox"
)

var t0 = time.Now()

type failed struct{ msg string }

func (f failed) Error() string { return f.msg }

func check(cond bool, format string, args ...any) {
	if !cond {
		panic(failed{fmt.Sprintf(format, args...)})
	}
}

func must(err error, what string) {
	if err != nil {
		panic(failed{fmt.Sprintf("%s: %v", what, err)})
	}
}

// step runs fn, printing "ok   name (1.2s): detail" or "FAIL name: why" (then exits 1 via cleanup).
func step(name string, fn func() string) {
	t := time.Now()
	defer func() {
		if r := recover(); r != nil {
			fmt.Printf("FAIL %s (%.1fs): %v\n", name, time.Since(t).Seconds(), r)
			panic(stepFailed{})
		}
	}()
	detail := fn()
	if detail != "" {
		detail = ": " + detail
	}
	fmt.Printf("ok   %s (%.1fs)%s\n", name, time.Since(t).Seconds(), detail)
}

type stepFailed struct{}

// made is what this run created, undone in reverse order at exit.
type made struct {
	sessions  []string
	snapshots []string
}

func main() { os.Exit(run()) }

func run() (code int) {
	ctx := context.Background()
	var m made
	var client *tenkisandbox.Client

	defer func() {
		if r := recover(); r != nil {
			if _, ok := r.(stepFailed); !ok {
				fmt.Printf("FAIL unexpected: %v\n", r)
			}
			code = 1
		}
		if client != nil {
			if !cleanup(client, &m) && code == 0 {
				code = 1
			}
			client.Close()
		}
		if code == 0 {
			fmt.Printf("PASS go sdk conformance (%.1fs)\n", time.Since(t0).Seconds())
		} else {
			fmt.Printf("FAILED go sdk conformance (%.1fs)\n", time.Since(t0).Seconds())
		}
	}()

	step("client from the environment", func() string {
		var err error
		client, err = tenkisandbox.NewClientFromEnv()
		must(err, "NewClientFromEnv")
		return client.Endpoint()
	})

	var session *tenkisandbox.Session
	step("create session", func() string {
		var err error
		session, err = client.Create(ctx, tenkisandbox.WithName("go-conformance"),
			tenkisandbox.WithTags("conformance", "Go"), tenkisandbox.WithWaitTimeout(10*time.Minute))
		if session != nil && session.ID != "" {
			m.sessions = append(m.sessions, session.ID)
		}
		must(err, "Create")
		check(session.State == tenkisandbox.SessionStateRunning, "state %s, want RUNNING", session.State)
		check(session.Name == "go-conformance", "name %q", session.Name)
		return session.ID
	})

	content := []byte(fmt.Sprintf("written before the snapshot %d\n", time.Now().UnixNano()))
	step("write note.txt", func() string {
		n, err := client.WriteFile(ctx, session.ID, "note.txt", content)
		must(err, "WriteFile")
		check(n == int64(len(content)), "wrote %d bytes, want %d", n, len(content))
		got, err := client.ReadFile(ctx, session.ID, "/home/tenki/note.txt")
		must(err, "ReadFile")
		check(string(got) == string(content), "read back %q", got)
		return fmt.Sprintf("%d bytes", n)
	})

	step("exec", func() string {
		res, err := client.Exec(ctx, session.ID, []string{"sh", "-c", "cat note.txt; echo err >&2; exit 3"}, nil)
		must(err, "Exec")
		check(res.ExitCode == 3, "exit %d, want 3", res.ExitCode)
		check(string(res.Stdout) == string(content), "stdout %q", res.Stdout)
		check(strings.TrimSpace(string(res.Stderr)) == "err", "stderr %q", res.Stderr)
		res, err = client.Exec(ctx, session.ID, []string{"cat"}, &tenkisandbox.ExecOptions{Stdin: []byte("via stdin")})
		must(err, "Exec with stdin")
		check(res.OK() && string(res.Stdout) == "via stdin", "stdin round trip: exit %d stdout %q", res.ExitCode, res.Stdout)
		return "exit 3, stdout, stderr, stdin"
	})

	// --- the spec's Go calls, as written ------------------------------------------------
	var snapshot *tenkisandbox.Snapshot
	var first *tenkisandbox.Snapshot
	step("CreateSnapshot (async)", func() string {
		snapshot, err := client.CreateSnapshot(ctx, session.ID, "baseline", nil)
		must(err, "CreateSnapshot")
		m.snapshots = append(m.snapshots, snapshot.ID)
		check(snapshot.State == tenkisandbox.SnapshotStateCreating || snapshot.State == tenkisandbox.SnapshotStateReady,
			"state %s, want CREATING (or READY)", snapshot.State)
		check(snapshot.SessionID == session.ID, "session_id %q", snapshot.SessionID)
		first = snapshot
		return snapshot.ID + " " + string(snapshot.State)
	})
	step("WaitSnapshotReady (first)", func() string {
		s, err := client.WaitSnapshotReady(ctx, first.ID, tenkisandbox.DefaultSnapshotCreateTimeout)
		must(err, "WaitSnapshotReady")
		check(s.State == tenkisandbox.SnapshotStateReady, "state %s", s.State)
		return string(s.State)
	})
	step("CreateSnapshotAndWait", func() string {
		var err error
		snapshot, err = client.CreateSnapshotAndWait(
			ctx,
			session.ID,
			"baseline",
			nil,
			tenkisandbox.DefaultSnapshotCreateTimeout,
		)
		if snapshot != nil {
			m.snapshots = append(m.snapshots, snapshot.ID)
		}
		must(err, "CreateSnapshotAndWait")
		check(snapshot.State == tenkisandbox.SnapshotStateReady, "state %s", snapshot.State)
		check(snapshot.Name == "baseline", "name %q", snapshot.Name)
		return fmt.Sprintf("%s size=%d compressed=%d memory=%d", snapshot.ID, snapshot.SizeBytes,
			snapshot.CompressedBytes, snapshot.MemoryBytes)
	})
	step("GetSnapshot", func() string {
		var err error
		snapshot, err = client.GetSnapshot(ctx, snapshot.ID)
		must(err, "GetSnapshot")
		check(snapshot.State == tenkisandbox.SnapshotStateReady, "state %s", snapshot.State)
		check(snapshot.SessionID == session.ID, "session_id %q", snapshot.SessionID)
		check(!snapshot.CreatedAt.IsZero(), "no created_at")
		return fmt.Sprintf("workspace=%s base_image=%s created=%s", snapshot.WorkspaceID, snapshot.BaseImageID,
			snapshot.CreatedAt.Format(time.RFC3339))
	})
	step("ListSnapshots", func() string {
		snapshots, err := client.ListSnapshots(ctx)
		must(err, "ListSnapshots")
		seen := map[string]bool{}
		for _, s := range snapshots {
			seen[s.ID] = true
		}
		check(seen[snapshot.ID] && seen[first.ID], "%d snapshots, ours (%s, %s) not among them", len(snapshots), first.ID, snapshot.ID)
		return fmt.Sprintf("%d snapshots", len(snapshots))
	})
	step("WaitSnapshotReady", func() string {
		var err error
		snapshot, err = client.WaitSnapshotReady(ctx, snapshot.ID, 5*time.Minute)
		must(err, "WaitSnapshotReady")
		check(snapshot.State == tenkisandbox.SnapshotStateReady, "state %s", snapshot.State)
		return string(snapshot.State)
	})

	var restoredSession *tenkisandbox.Session
	step("Create WithSnapshot+WithName (restore)", func() string {
		restored, err := client.Create(
			ctx,
			tenkisandbox.WithSnapshot(snapshot.ID),
			tenkisandbox.WithName("restored-copy"),
		)
		if restored != nil && restored.ID != "" {
			m.sessions = append(m.sessions, restored.ID)
		}
		must(err, "Create WithSnapshot")
		check(restored.ID != session.ID, "the restore reused the session id")
		check(restored.State == tenkisandbox.SessionStateRunning, "state %s", restored.State)
		check(restored.Name == "restored-copy", "name %q", restored.Name)
		check(restored.SourceSnapshotID == snapshot.ID, "source_snapshot_id %q, want %s", restored.SourceSnapshotID, snapshot.ID)
		restoredSession = restored
		return restored.ID
	})
	restored := restoredSession
	step("read note.txt in the restored session", func() string {
		got, err := client.ReadFile(ctx, restored.ID, "note.txt")
		must(err, "ReadFile")
		check(string(got) == string(content), "read %q, want %q", got, content)
		res, err := client.Exec(ctx, restored.ID, []string{"cat", "/home/tenki/note.txt"}, nil)
		must(err, "Exec")
		check(res.OK() && string(res.Stdout) == string(content), "exec cat: exit %d stdout %q", res.ExitCode, res.Stdout)
		return "same content"
	})

	step("DeleteSnapshot", func() string {
		id := snapshot.ID
		var err error
		snapshot, err = client.DeleteSnapshot(ctx, snapshot.ID)
		must(err, "DeleteSnapshot")
		check(snapshot.ID == id, "deleted %q, want %s", snapshot.ID, id)
		m.snapshots = remove(m.snapshots, id)
		_, err = client.GetSnapshot(ctx, id)
		if err == nil {
			s, _ := client.GetSnapshot(ctx, id)
			check(s.State == tenkisandbox.SnapshotStateDeleting || s.State == tenkisandbox.SnapshotStateDeleted,
				"after delete: state %s", s.State)
			return string(snapshot.State) + ", then " + string(s.State)
		}
		check(errors.Is(err, tenkisandbox.ErrSnapshotNotFound), "GetSnapshot after delete: %v", err)
		return string(snapshot.State) + ", then not found"
	})

	// --- errors ---------------------------------------------------------------------------
	step("ErrSnapshotNotFound", func() string {
		_, err := client.GetSnapshot(ctx, "snp_doesnotexist0000")
		check(err != nil, "GetSnapshot of an unknown id succeeded")
		check(errors.Is(err, tenkisandbox.ErrSnapshotNotFound), "errors.Is(err, ErrSnapshotNotFound) is false for %v", err)
		check(errors.Is(err, tenkisandbox.ErrSandbox), "not an ErrSandbox: %v", err)
		return err.Error()
	})
	step("ErrSessionNotFound", func() string {
		_, err := client.GetSession(ctx, "ses_doesnotexist0000")
		check(errors.Is(err, tenkisandbox.ErrSessionNotFound), "errors.Is(err, ErrSessionNotFound) is false for %v", err)
		return err.Error()
	})
	step("ErrUnauthorized", func() string {
		bad, err := tenkisandbox.NewClient(tenkisandbox.WithEndpoint(client.Endpoint()), tenkisandbox.WithAPIKey("tk_not_a_key"))
		must(err, "NewClient")
		defer bad.Close()
		_, err = bad.ListSnapshots(ctx)
		check(errors.Is(err, tenkisandbox.ErrUnauthorized), "errors.Is(err, ErrUnauthorized) is false for %v", err)
		return err.Error()
	})
	step("ErrFileNotFound", func() string {
		_, err := client.ReadFile(ctx, restored.ID, "no-such-file.txt")
		check(errors.Is(err, tenkisandbox.ErrFileNotFound), "errors.Is(err, ErrFileNotFound) is false for %v", err)
		return err.Error()
	})
	// a FAILED snapshot: terminate the session while its snapshot is being captured
	step("ErrSnapshotFailed: a snapshot whose session is terminated mid-capture", func() string {
		res, err := client.Exec(ctx, restored.ID, []string{"sh", "-c", "head -c 64M /dev/urandom > /dev/shm/noise"}, nil)
		must(err, "Exec (memory noise)")
		check(res.OK(), "noise: exit %d %s", res.ExitCode, res.Stderr)
		doomed, err := client.CreateSnapshot(ctx, restored.ID, "doomed", nil)
		must(err, "CreateSnapshot")
		m.snapshots = append(m.snapshots, doomed.ID)
		_, err = client.Terminate(ctx, restored.ID) // while the capture runs
		must(err, "Terminate")
		m.sessions = remove(m.sessions, restored.ID)
		got, err := client.WaitSnapshotReady(ctx, doomed.ID, tenkisandbox.DefaultSnapshotCreateTimeout)
		check(err != nil, "the capture outlived its terminated session: %s", stateOf(got))
		check(errors.Is(err, tenkisandbox.ErrSnapshotFailed), "errors.Is(err, ErrSnapshotFailed) is false for %v", err)
		var e *tenkisandbox.Error
		check(errors.As(err, &e) && e.FailureReason != "", "ErrSnapshotFailed without a failure reason: %v", err)
		wrapped := fmt.Errorf("restoring the save-point: %w", err)
		check(errors.Is(wrapped, tenkisandbox.ErrSnapshotFailed), "errors.Is through a caller's wrap")
		rec, err := client.GetSnapshot(ctx, doomed.ID)
		must(err, "GetSnapshot")
		check(rec.State == tenkisandbox.SnapshotStateFailed && rec.FailureReason == e.FailureReason,
			"the record: state %s, failure_reason %q", rec.State, rec.FailureReason)
		return fmt.Sprintf("failure_reason=%q", e.FailureReason)
	})
	step("snapshot of a terminated session is refused", func() string {
		s, err := client.CreateSnapshotAndWait(ctx, restored.ID, "after-terminate", nil, time.Minute)
		if s != nil {
			m.snapshots = append(m.snapshots, s.ID)
		}
		check(err != nil, "a snapshot of a terminated session succeeded: %s", stateOf(s))
		// refused on create: FAILED_PRECONDITION "session ... is TERMINATED; ..."
		check(errors.Is(err, tenkisandbox.ErrSessionTerminated), "errors.Is(err, ErrSessionTerminated) is false for %v", err)
		return err.Error()
	})
	return 0
}

func stateOf(s *tenkisandbox.Snapshot) string {
	if s == nil {
		return "no snapshot"
	}
	return string(s.State)
}

func remove(xs []string, x string) []string {
	out := xs[:0]
	for _, v := range xs {
		if v != x {
			out = append(out, v)
		}
	}
	return out
}

// cleanup terminates the sessions and deletes the snapshots this run made; false if any failed.
func cleanup(client *tenkisandbox.Client, m *made) bool {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	ok := true
	for i := len(m.sessions) - 1; i >= 0; i-- {
		if _, err := client.Terminate(ctx, m.sessions[i]); err != nil && !errors.Is(err, tenkisandbox.ErrSessionNotFound) {
			fmt.Printf("cleanup: terminate %s: %v\n", m.sessions[i], err)
			ok = false
		} else {
			fmt.Printf("cleanup: terminated %s\n", m.sessions[i])
		}
	}
	for i := len(m.snapshots) - 1; i >= 0; i-- {
		if _, err := client.DeleteSnapshot(ctx, m.snapshots[i]); err != nil && !errors.Is(err, tenkisandbox.ErrSnapshotNotFound) {
			fmt.Printf("cleanup: delete snapshot %s: %v\n", m.snapshots[i], err)
			ok = false
		} else {
			fmt.Printf("cleanup: deleted snapshot %s\n", m.snapshots[i])
		}
	}
	return ok
}
