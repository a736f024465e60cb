// A session older than the daemon, through pgjdbc: three statements prepared on the server
// (prepareThreshold=1: pgjdbc names them S_1, S_2, S_3 at their first execution), then, once
// a line arrives on stdin (the daemon has started), each executed 50 times through them.
//
// usage: java -cp postgresql.jar:. PgjdbcEarly PORT APP
import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.sql.*;

public class PgjdbcEarly {
    public static void main(String[] args) throws Exception {
        String url = "jdbc:postgresql://127.0.0.1:" + args[0] + "/postgres?user=postgres"
            + "&ApplicationName=" + args[1] + "&prepareThreshold=1";
        try (Connection c = DriverManager.getConnection(url)) {
            PreparedStatement[] ps = {
                c.prepareStatement("SELECT ?::int + 1 AS n"),
                c.prepareStatement("SELECT count(*) FROM pg_class WHERE relname <> ?"),
                c.prepareStatement("SELECT upper(?::text) AS u"),
            };
            run(ps);
            System.out.println("prepared");
            new BufferedReader(new InputStreamReader(System.in)).readLine();
            for (int i = 0; i < 50; i++) {
                run(ps);
            }
            for (PreparedStatement p : ps) {
                p.close();
            }
        }
        System.out.println("done");
    }

    static void run(PreparedStatement[] ps) throws SQLException {
        ps[0].setInt(1, 7);
        ps[1].setString(1, "x");
        ps[2].setString(1, "y");
        for (PreparedStatement p : ps) {
            try (ResultSet r = p.executeQuery()) {
                while (r.next()) {
                }
            }
        }
    }
}
