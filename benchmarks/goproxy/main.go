// Command goproxy serves containerd's own overlay snapshotter over a unix
// socket as a proxy plugin, the reference side of benchmarks/concurrent.py.
//
//	goproxy -root /var/lib/ref -address /run/ref.sock
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
	"github.com/containerd/containerd/snapshots/overlay"
	"google.golang.org/grpc"
)

func main() {
	root := flag.String("root", "", "state directory of the overlay snapshotter")
	address := flag.String("address", "", "unix socket to listen on")
	flag.Parse()
	if *root == "" || *address == "" {
		fmt.Fprintln(os.Stderr, "goproxy: -root and -address are required")
		os.Exit(2)
	}
	sn, err := overlay.NewSnapshotter(*root)
	if err != nil {
		fmt.Fprintln(os.Stderr, "goproxy:", err)
		os.Exit(1)
	}
	server := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(server, snapshotservice.FromSnapshotter(sn))
	l, err := net.Listen("unix", *address)
	if err != nil {
		fmt.Fprintln(os.Stderr, "goproxy:", err)
		os.Exit(1)
	}
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-stop
		server.GracefulStop()
	}()
	if err := server.Serve(l); err != nil {
		fmt.Fprintln(os.Stderr, "goproxy:", err)
		os.Exit(1)
	}
	sn.Close()
}
