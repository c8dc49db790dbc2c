package tenkisandbox_test

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/tenki-self-hosted/tenkibox/sdk/go/tenkisandbox"
)

// The snapshot spec's Go calls, as written (compiled by go test; run by conformance/go).
func Example_snapshots() {
	ctx := context.Background()
	client, err := tenkisandbox.NewClientFromEnv()
	if err != nil {
		return
	}
	defer client.Close()
	session, err := client.Create(ctx, tenkisandbox.WithName("debugbox"))
	if err != nil {
		return
	}
	defer client.Terminate(ctx, session.ID)

	snapshot, err := client.CreateSnapshot(ctx, session.ID, "baseline", nil)
	snapshot, err = client.CreateSnapshotAndWait(
		ctx,
		session.ID,
		"baseline",
		nil,
		tenkisandbox.DefaultSnapshotCreateTimeout,
	)
	snapshot, err = client.GetSnapshot(ctx, snapshot.ID)
	snapshots, err := client.ListSnapshots(ctx)
	snapshot, err = client.WaitSnapshotReady(ctx, snapshot.ID, 5*time.Minute)

	restored, err := client.Create(
		ctx,
		tenkisandbox.WithSnapshot(snapshot.ID),
		tenkisandbox.WithName("restored-copy"),
	)

	snapshot, err = client.DeleteSnapshot(ctx, snapshot.ID)

	if errors.Is(err, tenkisandbox.ErrSnapshotFailed) {
		// Inspect the snapshot record for the failure reason and recreate
		var e *tenkisandbox.Error
		if errors.As(err, &e) {
			fmt.Println(e.FailureReason)
		}
	}
	fmt.Println(len(snapshots), restored.SourceSnapshotID)
}
