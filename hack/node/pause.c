/*
 * The sandbox ("pause") container of the real node: it holds a pod's namespaces open, reaps the
 * zombies of a shared PID namespace, and exits when it is told to stop. containerd needs an image
 * of it for every pod, and no registry can be reached from here, so hack/node.sh builds it from
 * this file with gcc -static.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int signal_number) {
    (void)signal_number;
    _exit(0);
}

static void reap(int signal_number) {
    (void)signal_number;
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
}

static void on(int signal_number, void (*handler)(int)) {
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = handler;
    action.sa_flags = handler == reap ? SA_NOCLDSTOP : 0;
    if (sigaction(signal_number, &action, NULL) < 0) {
        perror("sigaction");
        exit(1);
    }
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "-v") == 0) {
        puts("modelfleet pause");
        return 0;
    }
    if (getpid() != 1) {
        fputs("warning: pause should be the first process of its PID namespace\n", stderr);
    }
    on(SIGINT, stop);
    on(SIGTERM, stop);
    on(SIGCHLD, reap);
    for (;;) {
        pause();
    }
}
