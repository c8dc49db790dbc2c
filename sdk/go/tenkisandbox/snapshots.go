package tenkisandbox

import (
	"context"
	"fmt"
	"time"
)

// SnapshotState is a snapshot's state without the wire's prefix ("READY").
type SnapshotState string

// Snapshot states.
const (
	SnapshotStateUnspecified SnapshotState = "UNSPECIFIED"
	SnapshotStateCreating    SnapshotState = "CREATING"
	SnapshotStateReady       SnapshotState = "READY"
	SnapshotStateFailed      SnapshotState = "FAILED"
	SnapshotStateDeleting    SnapshotState = "DELETING"
	SnapshotStateDeleted     SnapshotState = "DELETED"
)

// Snapshot is a VM capture of one session, disk and memory (tenki.sandbox.v1.Snapshot).
type Snapshot struct {
	ID              string
	SessionID       string
	WorkspaceID     string
	Name            string
	State           SnapshotState
	SizeBytes       int64
	CompressedBytes int64
	MemoryBytes     int64
	BaseImageID     string
	CreatedAt       time.Time
	ExpiresAt       *time.Time
	FailureReason   string

	Tags            []string
	Type            string // USER, PAUSE, TEMPLATE
	CPUCores        int
	MemoryMB        int
	DiskSizeGB      int
	DurabilityState string // LOCAL_READY, DURABLE, PROPAGATION_FAILED, DURABLE_CEPH
	RestoreMode     string
}

func snapshotFrom(m msg) *Snapshot {
	if !m.valid() {
		return nil
	}
	return &Snapshot{
		ID:              m.str("id"),
		SessionID:       m.str("session_id"),
		WorkspaceID:     m.str("workspace_id"),
		Name:            m.str("name"),
		State:           SnapshotState(m.enumName("state", "SNAPSHOT_STATE_")),
		SizeBytes:       m.int("size_bytes"),
		CompressedBytes: m.int("compressed_bytes"),
		MemoryBytes:     m.int("memory_bytes"),
		BaseImageID:     m.str("base_image_id"),
		CreatedAt:       m.timestamp("created_at"),
		ExpiresAt:       m.optTimestamp("expires_at"),
		FailureReason:   m.str("failure_reason"),
		Tags:            m.strs("tags"),
		Type:            m.enumName("type", "SNAPSHOT_TYPE_"),
		CPUCores:        int(m.int("cpu_cores")),
		MemoryMB:        int(m.int("memory_mb")),
		DiskSizeGB:      int(m.int("disk_size_gb")),
		DurabilityState: m.enumName("durability_state", "SNAPSHOT_DURABILITY_STATE_"),
		RestoreMode:     m.str("restore_mode"),
	}
}

// SnapshotOptions are CreateSnapshot's optional fields; nil means none.
type SnapshotOptions struct {
	ExpiresAt     time.Time // zero: no expiry
	StoreRawImage *bool
}

// CreateSnapshot starts a snapshot of a running session and returns it at once, usually
// CREATING (the request is async); see WaitSnapshotReady and CreateSnapshotAndWait.
func (c *Client) CreateSnapshot(ctx context.Context, sessionID string, name string, opts *SnapshotOptions) (*Snapshot, error) {
	req := newMsg("CreateSnapshotRequest").set("session_id", sessionID).set("async", true)
	if name != "" {
		req.set("name", name)
	}
	if opts != nil {
		if !opts.ExpiresAt.IsZero() {
			req.set("expires_at", opts.ExpiresAt)
		}
		if opts.StoreRawImage != nil {
			req.set("store_raw_image", *opts.StoreRawImage)
		}
	}
	resp, err := c.call(ctx, "CreateSnapshot", req)
	if err != nil {
		return nil, err
	}
	return snapshotFrom(resp.sub("snapshot")), nil
}

// CreateSnapshotAndWait is CreateSnapshot, then WaitSnapshotReady within timeout
// (timeout <= 0: DefaultSnapshotCreateTimeout). A FAILED snapshot is an error matching
// ErrSnapshotFailed, whose *Error carries the failure reason and the snapshot.
func (c *Client) CreateSnapshotAndWait(ctx context.Context, sessionID string, name string, opts *SnapshotOptions, timeout time.Duration) (*Snapshot, error) {
	if timeout <= 0 {
		timeout = DefaultSnapshotCreateTimeout
	}
	snap, err := c.CreateSnapshot(ctx, sessionID, name, opts)
	if err != nil {
		return nil, err
	}
	if done, err := settledSnapshot("CreateSnapshotAndWait", snap); done {
		return snap, err
	}
	return c.waitSnapshot(ctx, "CreateSnapshotAndWait", snap.ID, timeout)
}

// GetSnapshot reads a snapshot (ErrSnapshotNotFound when there is none).
func (c *Client) GetSnapshot(ctx context.Context, snapshotID string) (*Snapshot, error) {
	resp, err := c.call(ctx, "GetSnapshot", newMsg("GetSnapshotRequest").set("snapshot_id", snapshotID))
	if err != nil {
		return nil, err
	}
	return snapshotFrom(resp.sub("snapshot")), nil
}

// ListSnapshots lists the caller's snapshots (ListSnapshots RPC, every page).
func (c *Client) ListSnapshots(ctx context.Context) ([]*Snapshot, error) {
	return c.listSnapshots(ctx, "ListSnapshots", func() msg { return newMsg("ListSnapshotsRequest") })
}

// ListSessionSnapshots lists the snapshots of one session (every page).
func (c *Client) ListSessionSnapshots(ctx context.Context, sessionID string) ([]*Snapshot, error) {
	return c.listSnapshots(ctx, "ListSessionSnapshots", func() msg {
		return newMsg("ListSessionSnapshotsRequest").set("session_id", sessionID)
	})
}

func (c *Client) listSnapshots(ctx context.Context, method string, newReq func() msg) ([]*Snapshot, error) {
	out := []*Snapshot{}
	err := c.eachPage(ctx, method, newReq, "snapshots", func(m msg) { out = append(out, snapshotFrom(m)) })
	if err != nil {
		return nil, err
	}
	return out, nil
}

// WaitSnapshotReady polls GetSnapshot every 0.5 s until the snapshot is READY (timeout <= 0:
// DefaultSnapshotWaitTimeout). FAILED → ErrSnapshotFailed (with the failure reason);
// DELETING/DELETED → ErrInvalidState; out of time → ErrSnapshotWaitTimeout.
func (c *Client) WaitSnapshotReady(ctx context.Context, snapshotID string, timeout time.Duration) (*Snapshot, error) {
	if timeout <= 0 {
		timeout = DefaultSnapshotWaitTimeout
	}
	return c.waitSnapshot(ctx, "WaitSnapshotReady", snapshotID, timeout)
}

func (c *Client) waitSnapshot(ctx context.Context, op, id string, timeout time.Duration) (*Snapshot, error) {
	deadline := time.Now().Add(timeout)
	var last *Snapshot
	for {
		snap, err := c.GetSnapshot(ctx, id)
		if err != nil {
			return nil, err
		}
		last = snap
		if done, err := settledSnapshot(op, snap); done {
			if err != nil {
				return nil, err
			}
			return snap, nil
		}
		left := time.Until(deadline)
		if left <= 0 {
			return nil, &Error{Kind: ErrSnapshotWaitTimeout, Op: op, Snapshot: last,
				Message: fmt.Sprintf("snapshot %s still %s after %s", id, last.State, timeout)}
		}
		if err := sleep(ctx, min(pollInterval, left)); err != nil {
			return nil, mapError(op, ctx, err)
		}
	}
}

// settledSnapshot says whether a wait is over at snap, and with which error.
func settledSnapshot(op string, snap *Snapshot) (bool, error) {
	switch snap.State {
	case SnapshotStateReady:
		return true, nil
	case SnapshotStateFailed:
		reason := snap.FailureReason
		m := "snapshot " + snap.ID + " failed"
		if reason != "" {
			m += ": " + reason
		}
		return true, &Error{Kind: ErrSnapshotFailed, Op: op, Message: m, FailureReason: reason, Snapshot: snap}
	case SnapshotStateDeleting, SnapshotStateDeleted:
		return true, &Error{Kind: ErrInvalidState, Op: op, Snapshot: snap,
			Message: "snapshot " + snap.ID + " entered terminal state " + string(snap.State)}
	default:
		return false, nil
	}
}

// DeleteSnapshot deletes a snapshot and returns it as the server answered.
func (c *Client) DeleteSnapshot(ctx context.Context, snapshotID string) (*Snapshot, error) {
	resp, err := c.call(ctx, "DeleteSnapshot", newMsg("DeleteSnapshotRequest").set("snapshot_id", snapshotID))
	if err != nil {
		return nil, err
	}
	return snapshotFrom(resp.sub("snapshot")), nil
}
