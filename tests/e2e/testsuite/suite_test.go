// Package suite runs containerd's own snapshotter testsuite
// (github.com/containerd/containerd/snapshots/testsuite) against a stratasnap
// server, through containerd's proxy snapshotter: the same client containerd
// uses for a proxy plugin. Every test gets a fresh server on a fresh root.
//
// tests/e2e/test_containerd_testsuite.py builds and runs it offline against
// Debian's Go sources (GOPATH mode):
//
//	GO111MODULE=off GOPATH=/usr/share/gocode go test -c -o suite.test .
//	STRATASNAP_PYTHON=.venv/bin/python STRATASNAP_BACKEND=blockfile ./suite.test -test.root
package suite

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/pkg/testutil"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"google.golang.org/grpc"
)

func TestStratasnap(t *testing.T) {
	testutil.RequiresRoot(t)
	python := os.Getenv("STRATASNAP_PYTHON")
	backend := os.Getenv("STRATASNAP_BACKEND")
	if python == "" || backend == "" {
		t.Fatal("set STRATASNAP_PYTHON and STRATASNAP_BACKEND")
	}
	testsuite.SnapshotterSuite(t, "Stratasnap-"+backend, func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		return serve(python, backend, root)
	})
}

// serve starts `stratasnap serve` on a store under root and returns the proxy
// snapshotter talking to it, and what stops both.
func serve(python, backend, root string) (snapshots.Snapshotter, func() error, error) {
	// A socket path must fit in 108 bytes: the suite's roots are long, /tmp is short.
	sockDir, err := os.MkdirTemp("/tmp", "stratasnap-suite-")
	if err != nil {
		return nil, nil, err
	}
	sock := filepath.Join(sockDir, "s.sock")
	logPath := filepath.Join(root, "server.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		os.RemoveAll(sockDir)
		return nil, nil, err
	}
	args := []string{"-m", "stratasnap", "serve", "--root", filepath.Join(root, "store"),
		"--address", sock, "--backend", backend, "--log-level", "warning"}
	cmd := exec.Command(python, args...)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	if err := cmd.Start(); err != nil {
		logFile.Close()
		os.RemoveAll(sockDir)
		return nil, nil, err
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	stop := func() error {
		defer os.RemoveAll(sockDir)
		defer logFile.Close()
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case err := <-exited:
			return err
		case <-time.After(30 * time.Second):
			cmd.Process.Kill()
			<-exited
			return fmt.Errorf("stratasnap serve did not stop")
		}
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		select {
		case err := <-exited:
			exited <- err // for stop()
			stop()
			out, _ := os.ReadFile(logPath)
			return nil, nil, fmt.Errorf("stratasnap serve exited (%v): %s", err, out)
		default:
		}
		if time.Now().After(deadline) {
			stop()
			out, _ := os.ReadFile(logPath)
			return nil, nil, fmt.Errorf("stratasnap serve did not start: %s", out)
		}
		time.Sleep(20 * time.Millisecond)
	}
	dialer := func(ctx context.Context, target string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", strings.TrimPrefix(target, "unix://"))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := grpc.DialContext(ctx, "unix://"+sock, grpc.WithInsecure(), grpc.WithBlock(), grpc.WithContextDialer(dialer))
	if err != nil {
		stop()
		return nil, nil, err
	}
	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "stratasnap")
	return sn, func() error {
		sn.Close()
		conn.Close()
		return stop()
	}, nil
}
