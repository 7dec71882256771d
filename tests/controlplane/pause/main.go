// Command pause is the Pod sandbox's process: it holds the Pod's namespaces open and does
// nothing else. It is built here (the upstream pause image cannot be pulled on this machine)
// and packed into the sandbox image by images/build.py. As PID 1 of the sandbox it must reap
// the zombies of processes that share its PID namespace and exit on SIGINT/SIGTERM.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	signals := make(chan os.Signal, 8)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for sig := range signals {
		if sig == syscall.SIGCHLD {
			for {
				var status syscall.WaitStatus
				pid, err := syscall.Wait4(-1, &status, syscall.WNOHANG, nil)
				if pid <= 0 || err != nil {
					break
				}
			}
			continue
		}
		os.Exit(0)
	}
}
