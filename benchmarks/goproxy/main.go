// Command goproxy serves one of containerd's own snapshotters (overlayfs or
// native, from containerd's Go packages) on a unix socket with containerd's
// snapshots v1 gRPC service, the way an external proxy snapshotter runs. It
// is the reference for benchmarks that drive stratasnap over its socket
// (benchmarks/killcampaign.py): the same client, the same API, containerd's
// code behind it.
//
//	goproxy -address /run/ref.sock -root /mnt/ref -snapshotter overlayfs [-async-remove]
//
// -async-remove is what containerd's overlayfs plugin does by default
// (sync_remove = false): Remove renames, Cleanup deletes.
//
// Build offline against Debian's packages (GOPATH mode):
//
//	GO111MODULE=off GOPATH=/usr/share/gocode go build -o goproxy .
package main

import (
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"syscall"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/contrib/snapshotservice"
	"github.com/containerd/containerd/errdefs"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/native"
	"github.com/containerd/containerd/snapshots/overlay"
	"google.golang.org/grpc"
)

func open(kind, root string, asyncRemove bool) (snapshots.Snapshotter, error) {
	switch kind {
	case "overlayfs":
		var opts []overlay.Opt
		if asyncRemove {
			opts = append(opts, overlay.AsynchronousRemove)
		}
		return overlay.NewSnapshotter(root, opts...)
	case "native":
		return native.NewSnapshotter(root)
	}
	return nil, fmt.Errorf("unknown snapshotter %q (overlayfs or native)", kind)
}

// service is containerd's snapshot service with one difference: List of a
// store that was never written to (its storage has no bucket yet and says
// "not found", passed through as UNKNOWN) is an empty list, as containerd's
// metadata layer, which never lists an empty backend, would see it.
type service struct {
	snapshotsapi.SnapshotsServer
}

func (s service) List(r *snapshotsapi.ListSnapshotsRequest, ss snapshotsapi.Snapshots_ListServer) error {
	err := s.SnapshotsServer.List(r, ss)
	if errdefs.IsNotFound(err) {
		return nil
	}
	return errdefs.ToGRPC(err)
}

func main() {
	address := flag.String("address", "", "unix socket to serve on")
	root := flag.String("root", "", "the snapshotter's root directory")
	kind := flag.String("snapshotter", "overlayfs", "overlayfs or native")
	asyncRemove := flag.Bool("async-remove", false, "overlayfs: leave removed storage to Cleanup")
	flag.Parse()
	if *address == "" || *root == "" {
		fmt.Fprintln(os.Stderr, "goproxy: -address and -root are required")
		os.Exit(2)
	}
	sn, err := open(*kind, *root, *asyncRemove)
	if err != nil {
		fmt.Fprintf(os.Stderr, "goproxy: cannot open %s on %s: %v\n", *kind, *root, err)
		os.Exit(1)
	}
	_ = os.Remove(*address) // a killed predecessor leaves its socket
	l, err := net.Listen("unix", *address)
	if err != nil {
		fmt.Fprintf(os.Stderr, "goproxy: listen %s: %v\n", *address, err)
		os.Exit(1)
	}
	server := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(server, service{snapshotservice.FromSnapshotter(sn)})
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-stop
		server.GracefulStop()
	}()
	if err := server.Serve(l); err != nil {
		fmt.Fprintf(os.Stderr, "goproxy: serve: %v\n", err)
		os.Exit(1)
	}
	_ = sn.Close()
}
